"""Progress for long work: a tqdm bar on a terminal, and a plain log line every `every` seconds otherwise.

A bar's carriage-return redraws turn a log file into one endless line (or nothing, when tqdm is told to stay quiet
off a terminal), so when stderr is not a terminal, `progress` reports "desc: n/total (rate, ETA)" lines instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("xmodal.progress")

LINE_EVERY_S = 30.0  # seconds between progress lines when output is not a terminal


def _is_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class LineProgress:
    """The part of tqdm's interface xmodal uses (iterate, update, close, context manager), as occasional lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, every: float = LINE_EVERY_S, enabled: bool = True):
        self.iterable, self.desc, self.unit, self.every, self.enabled = iterable, desc, unit, every, enabled
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self._start_n = total, int(initial), int(initial)
        self._start = self._last = time.monotonic()
        self._closed = False

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.desc}: {self.n}{of} {self.unit} ({rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed"
        if self.total is not None and rate > 0:
            text += f", ETA {_duration(max(0, self.total - self.n) / rate)}"
        return text + ")"

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if self.enabled and now - self._last >= self.every:
            self._last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self.enabled and not self._closed and time.monotonic() - self._start >= self.every:
            log.info("%s, done", self.line())  # long work says when it finished; short work stays quiet
        self._closed = True

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:  # tqdm compatibility: nothing to redraw
        pass

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, initial: int = 0, leave: bool = True, every: float = LINE_EVERY_S):
    """A tqdm bar on a terminal, LineProgress lines otherwise; `enabled=False` shows nothing either way."""
    if _is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, initial=initial, leave=leave,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, every=every,
                        enabled=enabled)


__all__ = ["LINE_EVERY_S", "LineProgress", "progress"]

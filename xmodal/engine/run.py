"""Run folder layout and logging: config.yaml, metrics.jsonl and checkpoints/, written by rank 0 only.

One writer per run folder: `run_folder_lock(path)` holds the folder's lock (xmodal.lock) and may be entered
again by the same process (the `distill` command holds it for the whole job, the engine for each fit).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from xmodal.distributed import is_main_process
from xmodal.engine.checkpoint import plain_config
from xmodal.io import append_jsonl, atomic_write_text
from xmodal.lock import FolderLock

log = logging.getLogger(__name__)

_HELD: dict[Path, list] = {}  # resolved run folder → [FolderLock, how many holders in this process]


@contextlib.contextmanager
def run_folder_lock(path: str | os.PathLike) -> Iterator[FolderLock]:
    """Hold the exclusive lock of run folder `path` for the block; refused (LockedError naming the holder's
    process id) while another process holds it. Nested holders in one process share the lock."""
    key = Path(path).resolve()
    entry = _HELD.get(key)
    if entry is None:
        entry = [FolderLock(path, "run folder").acquire(), 0]
        _HELD[key] = entry
    entry[1] += 1
    try:
        yield entry[0]
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            _HELD.pop(key, None)
            entry[0].release()


class RunDir:
    """`run_dir/config.yaml`, `run_dir/metrics.jsonl`, `run_dir/checkpoints/`; non-main ranks write nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.main = is_main_process()
        if self.main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    def write_config(self, config: Any) -> None:
        """Store the resolved config beside the checkpoints (atomically)."""
        if self.main and config is not None:
            atomic_write_text(self.config, yaml.safe_dump(plain_config(config), sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        """Append one metrics record (with a wall-clock timestamp) to metrics.jsonl."""
        if self.main:
            append_jsonl(self.metrics, {**record, "time": round(time.time(), 3)})

    def truncate_metrics(self, step: int) -> int:
        """Keep only the records of steps ≤ `step` (a resume replays what came after); returns how many went.

        Rewritten atomically, so a crash leaves the old file or the truncated one.
        """
        if not self.main or not self.metrics.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut short by a crash mid-append
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > step:
                dropped += 1
                continue
            kept.append(line + "\n")
        if dropped:
            atomic_write_text(self.metrics, "".join(kept))
            log.info("%s: dropped %d records logged after step %d (they are replayed from the checkpoint)",
                     self.metrics, dropped, step)
        return dropped

    def remove_stale_temps(self) -> None:
        """Delete temp files of config.yaml / metrics.jsonl left by a writer killed mid-write."""
        if self.main and self.path.is_dir():
            for name in (self.config.name, self.metrics.name):
                for p in self.path.glob(f".{name}.*.tmp"):
                    p.unlink(missing_ok=True)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a truncated last line (crash mid-append) is skipped."""
    import json

    records = []
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line (a run interrupted mid-write)", path)
    return records

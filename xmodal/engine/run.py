"""Run folder layout and logging: config.yaml, metrics.jsonl and checkpoints/, written by rank 0 only.

One writer per run folder: `run_folder_lock(path)` holds the folder's lock (xmodal.lock) and may be entered
again by the same process (the `distill` command holds it for the whole job, the engine for each fit).
Metrics records can also go to the reporters named in `train.report_to` (`REPORTERS`: tensorboard writes
every numeric key of each record as a scalar at its step under run_dir/tensorboard/).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from xmodal.distributed import is_main_process
from xmodal.engine.checkpoint import plain_config
from xmodal.errors import ConfigError
from xmodal.io import append_jsonl, atomic_write_text
from xmodal.lock import FolderLock
from xmodal.registry import Registry

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Receives every metrics record that goes to metrics.jsonl (rank 0 only)."""

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def restart(self, step: int) -> None: ...  # records after `step` are replayed (a resume): drop them

    def close(self) -> None: ...


# name → factory(run folder) -> Reporter; `train.report_to` lists names from here
REPORTERS: Registry[Callable[[Path], Reporter]] = Registry("metrics reporter (train.report_to)")


def numeric_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers other than its step and wall-clock time (bools and strings are not scalars)."""
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardReporter:
    """TensorBoard scalars in `run_dir/tensorboard/`: each numeric key of a record at the record's step.

    Nothing is written (no folder, no event file) before the first record.

    Event files are appended to across resumes; the first write after a resume at step S marks the restart
    (purge_step = S + 1), so TensorBoard drops the replayed steps an interrupted attempt had already written,
    as metrics.jsonl does.
    """

    def __init__(self, run_dir: Path):
        check_tensorboard()
        self.folder = Path(run_dir) / "tensorboard"
        self.writer = None
        self.purge_step: int | None = None

    def restart(self, step: int) -> None:
        if self.writer is None:
            self.purge_step = step + 1

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
            self._finalizer = weakref.finalize(self, self.writer.close)
        wall = record.get("time")
        for key, value in numeric_scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_tensorboard() -> None:
    """TensorBoard is an optional dependency: a ConfigError with the install command when it is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"train.report_to lists 'tensorboard', but the tensorboard package is not installed ({e}); "
            "install it with: pip install 'xmodal[tensorboard]' (or remove tensorboard from train.report_to)"
        ) from None


REPORTERS.register("tensorboard", TensorBoardReporter)

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
    """`run_dir/config.yaml`, `run_dir/metrics.jsonl`, `run_dir/checkpoints/`; non-main ranks write nothing.

    `report_to` names reporters (`REPORTERS`) that receive each record too; an unknown name or a reporter whose
    package is missing is a ConfigError here, at the start of the run, on every rank.
    """

    def __init__(self, path: str | os.PathLike, report_to: Sequence[str] = ()):
        self.path = Path(path)
        self.main = is_main_process()
        factories = []
        for name in report_to:
            try:
                factories.append(REPORTERS.get(name))
            except ConfigError as e:
                raise ConfigError(f"train.report_to: {e}") from None
        # built on every rank, so a missing package fails every rank alike; only rank 0 ever logs to them
        self.reporters: list[Reporter] = [f(self.path) for f in factories]
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
        """Append one metrics record (with a wall-clock timestamp) to metrics.jsonl, and to each reporter."""
        if self.main:
            record = {**record, "time": round(time.time(), 3)}
            append_jsonl(self.metrics, record)
            step = record.get("step")
            if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
                for reporter in self.reporters:
                    reporter.log(record, int(step))

    def close(self) -> None:
        """Flush and close the reporters (they close themselves when the RunDir is collected, too)."""
        for reporter in self.reporters:
            reporter.close()

    def truncate_metrics(self, step: int) -> int:
        """Keep only the records of steps ≤ `step` (a resume replays what came after); returns how many went.

        Rewritten atomically, so a crash leaves the old file or the truncated one.
        """
        for reporter in self.reporters:
            reporter.restart(step)
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

"""Run folder layout and logging: config.yaml, metrics.jsonl and checkpoints/, written by rank 0 only."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from xmodal.distributed import is_main_process
from xmodal.engine.checkpoint import plain_config
from xmodal.io import append_jsonl, atomic_write_text

log = logging.getLogger(__name__)


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

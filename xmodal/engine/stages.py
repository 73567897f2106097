"""Multi-stage runs: a record of each stage's identity, status and final checkpoint, so a run resumes by stage.

`run_dir/stages.json` (written atomically, by rank 0) lists the planned stages in order. A job marks a stage
`running` before it trains and `done` with its final checkpoint and results after it. On resume, finished stages
are skipped (the job reloads their weights from the recorded checkpoint), the interrupted stage continues from
its latest checkpoint, and a plan that no longer matches a stage already trained is refused, naming the stage
and what differs (an interrupted stage may change what the engine lets a resume change, e.g. the learning
rate; a finished one nothing). Stages not started yet may change freely.

    stages = StageRun(run_dir, [Stage("stage0", "stages/0", identity0, steps0), ...], resume=cfg.resume)
    for i, record in enumerate(stages):
        if record.status == DONE:
            ...                                   # reload stages.checkpoint(i) if a later stage needs it
            continue
        stages.start(i)
        out = Distiller(..., run_dir=stages.folder(i), resume=stages.resume(i)).fit()
        stages.finish(i, step=out["step"], result=...)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xmodal.distributed import is_main_process
from xmodal.engine.checkpoint import (
    RESUME_AUTO,
    RESUME_LATEST,
    RESUME_MAY_CHANGE,
    CheckpointManager,
    config_differences,
    plain_config,
    step_path,
)
from xmodal.engine.ddp import barrier
from xmodal.errors import CheckpointError
from xmodal.io import atomic_write_json

log = logging.getLogger(__name__)

STAGES_FILE = "stages.json"
STAGES_FORMAT = 1
PENDING, RUNNING, DONE = "pending", "running", "done"


def train_identity(train: Any) -> dict[str, Any]:
    """The part of a train config that decides what a stage learns: all but the keys a resume may change."""
    plain = plain_config(train)
    return {k: v for k, v in plain.items() if k not in RESUME_MAY_CHANGE}


@dataclass
class Stage:
    """One planned stage: its folder (relative to the run folder, "" for the run folder itself), its identity
    (JSON-plain data that decides what the stage trains, e.g. model and train config) and its step count."""

    name: str
    folder: str
    identity: dict[str, Any]
    steps: int


@dataclass
class StageRecord(Stage):
    """A stage as recorded: its plan, its status, its final checkpoint (relative to the run folder), its results."""

    status: str = PENDING
    checkpoint: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


class StageRun:
    """The stages of one run folder, merged with the record of an earlier run of it when resuming.

    `resume`: the job's resume setting. Without it, a run folder whose record shows a started stage is refused
    (as the engine refuses a folder holding checkpoints). With it, finished stages stay finished and the others
    continue from their newest checkpoint if they have one (a checkpoint path given as `resume` applies to the
    last stage); `latest` on a folder where no stage has started is refused, as the engine refuses it.
    """

    def __init__(self, run_dir: str | os.PathLike, plan: Sequence[Stage], resume: str | os.PathLike | None = None):
        if not plan:
            raise ValueError("a staged run needs at least one stage")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STAGES_FILE
        self.resume_from = None if resume is None else str(resume)
        previous = self._read()
        barrier()  # every rank has read the old record before rank 0 replaces it
        self.records = self._merge(previous, list(plan))
        if self.resume_from == RESUME_LATEST and not self._anything_to_resume():
            raise _nothing_to_resume(self.run_dir)
        self._write()

    @staticmethod
    def check_resumable(run_dir: str | os.PathLike, resume: str | os.PathLike | None) -> None:
        """Refuse `resume: latest` on a folder where no stage has started, before a job does expensive setup
        (loading or training its teacher) that the refusal would waste."""
        if resume is None or str(resume) != RESUME_LATEST:
            return
        run_dir = Path(run_dir)
        folders = [run_dir, *sorted((run_dir / "stages").glob("*"))]
        if not (run_dir / STAGES_FILE).is_file() and all(
                CheckpointManager(f / "checkpoints").latest() is None for f in folders):
            raise _nothing_to_resume(run_dir)

    # ------------------------------------------------------------ reading and merging

    def _read(self) -> list[StageRecord]:
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            records = [StageRecord(**r) for r in data["stages"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.path}: not a readable stage record ({type(e).__name__}: {e}); it is written atomically, so "
                "it was edited or copied in part. Restore it, or start a new run folder"
            ) from e
        return records

    def _merge(self, previous: list[StageRecord], plan: list[Stage]) -> list[StageRecord]:
        started = [r for r in previous if r.status != PENDING]
        if started and self.resume_from is None:
            raise CheckpointError(
                f"{self.run_dir} already holds a staged run ({STAGES_FILE}: {self._summary(previous)}); continue it "
                "with --resume (resume: latest), or choose a new run folder"
            )
        last = len(plan) - 1
        for old in previous[len(plan):]:
            if old.status != PENDING:
                raise CheckpointError(
                    f"{self.path}: {old.name} ({self._where(old.folder)}) was trained, but the plan now has "
                    f"{len(plan)} stage(s). Restore the stages as they were, or start a new run folder"
                )
        records = []
        for i, stage in enumerate(plan):
            old = previous[i] if i < len(previous) else None
            if old is None or old.status == PENDING:
                records.append(StageRecord(**asdict(stage)))
                continue
            where = f"{stage.name} ({self._where(stage.folder)})"
            if old.folder != stage.folder:
                raise CheckpointError(
                    f"{self.path}: {where} was trained in {self._where(old.folder)}; the plan now puts it in "
                    f"{self._where(stage.folder)} (the number of stages changed). Restore the stages as they were, "
                    "or start a new run folder"
                )
            may_change = () if old.status == DONE else RESUME_MAY_CHANGE  # the engine checks the rest on resume
            diffs = config_differences(old.identity, stage.identity, may_change=may_change)
            if old.status == DONE and i != last and old.steps != stage.steps:
                diffs.append(f"steps: {old.steps} → {stage.steps} (the stages after it learned from its result)")
            if diffs:
                raise CheckpointError(
                    f"{self.path}: {where} differs from the stage this run "
                    f"{'trained' if old.status == DONE else 'began'}:"
                    "\n  " + "\n  ".join(diffs)
                    + "\nRestore these settings, or start a new run folder to train the new plan"
                )
            record = StageRecord(**{**asdict(old), "name": stage.name, "steps": stage.steps})
            if old.status == DONE and old.steps != stage.steps:  # the last stage trains on to its new length
                record.status = RUNNING
            records.append(record)
        return records

    def _anything_to_resume(self) -> bool:
        return any(r.status != PENDING or CheckpointManager(self.folder(i) / "checkpoints").latest() is not None
                   for i, r in enumerate(self.records))

    def _where(self, folder: str) -> str:
        return folder or "the run folder"

    @staticmethod
    def _summary(records: Sequence[StageRecord]) -> str:
        return ", ".join(f"{r.name} {r.status}" for r in records)

    def _write(self) -> None:
        if is_main_process():
            atomic_write_json(self.path, {"format": STAGES_FORMAT, "stages": [asdict(r) for r in self.records]})

    # ------------------------------------------------------------ the job's view

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> StageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[StageRecord]:
        return iter(self.records)

    @property
    def finished(self) -> bool:
        return all(r.status == DONE for r in self.records)

    def first_open(self) -> int:
        """Index of the first stage that is not finished (len(self) when all are)."""
        return next((i for i, r in enumerate(self.records) if r.status != DONE), len(self.records))

    def folder(self, i: int) -> Path:
        return self.run_dir / self.records[i].folder if self.records[i].folder else self.run_dir

    def resume(self, i: int) -> str | None:
        """The engine's `resume` for stage i: None on a fresh run, else `auto` (its newest checkpoint if it has
        one, else a fresh start), or the checkpoint path given for the last stage."""
        if self.resume_from is None:
            return None
        if i == len(self.records) - 1 and self.resume_from not in (RESUME_LATEST, RESUME_AUTO):
            return self.resume_from
        return RESUME_AUTO

    def checkpoint(self, i: int) -> Path:
        """The final checkpoint of finished stage i (it must exist: later stages start from it)."""
        r = self.records[i]
        path = self.run_dir / r.checkpoint if r.checkpoint else None
        if r.status != DONE or path is None or not path.is_file():
            raise CheckpointError(
                f"{self.path}: {r.name} is recorded as finished with checkpoint {path}, which is missing; restore "
                f"it (later stages start from it), or mark the stage pending in {STAGES_FILE} to train it again"
            )
        return path

    def start(self, i: int) -> None:
        self.records[i].status = RUNNING
        self._write()

    def finish(self, i: int, step: int, result: Mapping[str, Any] | None = None) -> None:
        """Record stage i as finished at `step` (its final checkpoint is that step's) with its results."""
        r = self.records[i]
        r.status = DONE
        r.checkpoint = step_path(Path(r.folder) / "checkpoints", int(step)).as_posix()
        r.result = plain_config(dict(result or {}))
        self._write()


__all__ = ["DONE", "PENDING", "RUNNING", "STAGES_FILE", "Stage", "StageRecord", "StageRun", "train_identity"]


def _nothing_to_resume(run_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"nothing to resume in {run_dir}: no stage has started (no {STAGES_FILE} entry and no "
        "checkpoint in the stage folders). To start a new run there, leave out --resume (resume: null)"
    )

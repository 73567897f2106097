"""The training loop: a frozen teacher (online or cached) teaches a student through a LossSet.

`Distiller(...).fit()` runs AdamW with warmup + cosine, gradient accumulation and clipping, bf16 autocast where
supported, periodic logging, evaluation and atomic checkpoints, exact resume, and DDP under torchrun.
`compute_loss` / `train_step` are the same step as plain functions (benchmarks, custom loops).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.config import TrainConfig
from xmodal.device import autocast, bf16_supported, seed_everything
from xmodal.distributed import rank, world_size
from xmodal.engine.cache import TeacherCache
from xmodal.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_AUTO,
    RESUME_LATEST,
    RESUME_MAY_CHANGE,
    RESUME_MAY_RETUNE,
    CheckpointManager,
    capture_rng,
    check_resume_compatible,
    load_checkpoint,
    plain_config,
    restore_rng,
    retuned_settings,
    step_path,
)
from xmodal.engine.data import BatchStream, to_device
from xmodal.engine.ddp import all_reduce_mean, any_rank, barrier, gather_objects, init_distributed, unwrap, wrap_ddp
from xmodal.engine.run import RunDir, run_folder_lock
from xmodal.engine.schedule import build_optimizer, build_scheduler
from xmodal.errors import CheckpointError, ConfigError, XmodalError
from xmodal.features import Features
from xmodal.lock import LockedError
from xmodal.losses import LossOutput, LossSet

log = logging.getLogger(__name__)

Outputs = Mapping[str, Features]
Teacher = Callable[[Mapping[str, Any]], Outputs]
Evaluator = Callable[[nn.Module], Mapping[str, float]]


class NonFiniteLossError(XmodalError, RuntimeError):
    """The loss, the gradient norm or a module buffer (e.g. BatchNorm statistics) became NaN or infinite; the
    last good step (buffers as they were before the failing step) is on disk when one was completed."""

    def __init__(self, message: str, step: int, parts: Mapping[str, float], checkpoint: Path | None):
        super().__init__(message)
        self.step, self.parts, self.checkpoint = step, dict(parts), checkpoint


class _NonFinite(Exception):
    def __init__(self, parts: Mapping[str, float]):
        super().__init__()
        self.parts = dict(parts)


# ---------------------------------------------------------------- the step as functions


class Objective(nn.Module):
    """Student + losses as one module, so DDP synchronises the losses' parameters (temperatures) too."""

    def __init__(self, student: nn.Module, losses: LossSet):
        super().__init__()
        self.student = student
        self.losses = losses

    def forward(self, batch: Mapping[str, Any], teacher_out: Outputs | None) -> tuple[Tensor, dict[str, Tensor]]:
        student_out = self.student(batch)
        if not isinstance(student_out, Mapping) or not all(isinstance(v, Features) for v in student_out.values()):
            raise ConfigError(
                f"the student must return a dict of modality → Features, got {type(student_out).__name__}"
            )
        out = self.losses(student_out, teacher_out, batch)
        return out.loss, out.parts


def teacher_outputs(teacher: Teacher | TeacherCache | None, batch: Mapping[str, Any], device: torch.device,
                    precision: str = "auto") -> dict[str, Features] | None:
    """Frozen-teacher outputs for a batch on `device`: cache lookup, or the teacher under inference mode.

    Online outputs are cloned out of inference mode so losses can use them next to tensors that need grad.
    """
    if teacher is None:
        return None
    if isinstance(teacher, TeacherCache):
        return {k: f.to(device) for k, f in teacher(batch).items()}
    with torch.inference_mode(), autocast(device, precision):
        out = teacher(batch)
    if not isinstance(out, Mapping) or not all(isinstance(v, Features) for v in out.values()):
        raise ConfigError(f"the teacher must return a dict of modality → Features, got {type(out).__name__}")
    return {k: f.map(torch.Tensor.clone, include_mask=True) for k, f in out.items()}


def compute_loss(objective: nn.Module, teacher: Teacher | TeacherCache | None, batch: Mapping[str, Any],
                 device: torch.device, precision: str = "auto") -> LossOutput:
    """Move the batch to `device`, get teacher outputs, run student + losses under autocast."""
    batch = to_device(batch, device)
    t_out = teacher_outputs(teacher, batch, device, precision)
    with autocast(device, precision):
        loss, parts = objective(batch, t_out)
    return LossOutput(loss, parts)


def train_step(objective: nn.Module, optimizer: torch.optim.Optimizer, teacher: Teacher | TeacherCache | None,
               batch: Mapping[str, Any], device: torch.device, *, precision: str = "auto",
               clip_grad_norm: float | None = None, scheduler: Any = None) -> LossOutput:
    """One optimizer step on one batch (no accumulation, no checks): the engine's step, for benchmarks."""
    optimizer.zero_grad(set_to_none=True)
    out = compute_loss(objective, teacher, batch, device, precision)
    out.loss.backward()
    if clip_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return out


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: length of `ids`, else the first dim of the first tensor found."""
    if isinstance(batch, Mapping):
        if "ids" in batch:
            return len(batch["ids"])
        values: Iterable = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return int(batch.shape[0]) if isinstance(batch, Tensor) and batch.dim() else 0
    for v in values:
        n = batch_size_of(v)
        if n:
            return n
    return 0


# ---------------------------------------------------------------- the loop


@dataclass
class _Snapshot:
    """The last good state besides parameters and optimizer, taken at the start of each step: RNG, data position
    and module buffers (a forward pass updates BatchNorm statistics before a step can fail or be interrupted)."""

    rng: dict[str, Any]
    data: dict[str, int]
    step: int = -1
    buffers: dict[str, Tensor] = field(default_factory=dict)


class Distiller:
    """Train `student` against `losses` (and a frozen `teacher`, cached or online) for `cfg.steps` steps.

    data: a map-style Dataset (the engine builds a resumable, rank-aware loader; batch_size is global) or any
    iterable of batch dicts (resume then skips batches). `config` is the resolved job config (saved in each
    checkpoint; a resume with a different one is refused unless only keys in `resume_may_change` differ).
    `resume`: None (a new run; refused if the folder holds checkpoints), "latest" (the newest intact checkpoint;
    an error when there is none), "auto" (resume if there is one, else start), or a checkpoint path.
    While `fit` runs, the run folder is locked: a second writer is refused.
    `find_unused_parameters` (DDP only) tolerates student parameters the losses never reach (e.g. open_clip's
    logit_scale when only the towers are used); set False for a little speed when every parameter is used.
    """

    def __init__(
        self,
        student: nn.Module,
        losses: LossSet,
        data: Any,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        teacher: Teacher | TeacherCache | str | os.PathLike | None = None,
        evaluator: Evaluator | None = None,
        config: Any = None,
        teacher_fingerprint: str | None = None,
        resume: str | os.PathLike | None = None,
        collate_fn: Callable | None = None,
        resume_may_change: Sequence[str] = (),
        find_unused_parameters: bool = True,
        progress: bool = True,
    ):
        if cfg.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be at least 1, got {cfg.grad_accum}")
        if cfg.batch_size < 1:
            raise ConfigError(f"train.batch_size must be at least 1, got {cfg.batch_size}")
        self.cfg = cfg
        self.device = init_distributed(cfg.device)
        self.rank, self.world = rank(), world_size()
        self.student, self.losses = student, losses
        self.evaluator = evaluator
        self.config = config
        self.resume = resume
        self.resume_may_change = (*RESUME_MAY_CHANGE, *resume_may_change)
        self.progress = progress

        if isinstance(teacher, (str, os.PathLike)):
            teacher = TeacherCache(teacher, fingerprint=teacher_fingerprint)
        if isinstance(teacher, TeacherCache):
            if teacher_fingerprint is not None and teacher.fingerprint != teacher_fingerprint:
                raise CheckpointError(
                    f"teacher cache {teacher.path} was built by teacher {teacher.fingerprint}, but this run's "
                    f"teacher is {teacher_fingerprint}; rebuild the cache with `xmodal cache`"
                )
            teacher_fingerprint = teacher.fingerprint
        elif isinstance(teacher, nn.Module):
            trainable = {id(p): n for m in (student, losses) for n, p in m.named_parameters()}
            shared = [n for n, p in teacher.named_parameters() if id(p) in trainable]
            if shared:
                raise ConfigError(
                    f"the teacher shares parameters with the student (e.g. '{shared[0]}'); a frozen teacher needs "
                    "its own copy (copy.deepcopy the model before building the student from it)"
                )
            teacher.eval().requires_grad_(False).to(self.device)
        self.teacher = teacher
        self.teacher_fingerprint = teacher_fingerprint

        student.to(self.device)
        losses.to(self.device)
        self.objective = Objective(student, losses)
        self.model = wrap_ddp(self.objective, self.device, find_unused_parameters)
        self.optimizer = build_optimizer([student, losses], cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.run = RunDir(run_dir, report_to=cfg.report_to)
        self.ckpts = CheckpointManager(self.run.checkpoints, cfg.keep_last)
        self.stream = BatchStream(
            data, global_batch=cfg.batch_size, rank=self.rank, world_size=self.world, seed=cfg.seed,
            collate_fn=collate_fn, num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
        )
        self.step = 0
        self.saved_step: int | None = None
        self.saved_path: Path | None = None
        self._started = False
        self._updating = False
        self._buffer_store: dict[str, Tensor] = {}
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    # ------------------------------------------------------------ state

    def state_dict(self, snapshot: _Snapshot | None = None) -> dict[str, Any]:
        """Everything a resume needs; call on every rank (RNG states are gathered from all ranks)."""
        from xmodal import __version__

        snap = snapshot or _Snapshot(capture_rng(), self.stream.state())
        per_rank = gather_objects(snap.rng)
        sched = self.scheduler.state_dict()
        sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))  # rebuilt from the config on resume
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap(self.student).state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": sched,
            "step": self.step,
            "data": dict(snap.data),
            "rng": snap.rng,
            "rng_per_rank": per_rank if self.world > 1 else [],
            "world_size": self.world,
            "config": None if self.config is None else plain_config(self.config),
            "teacher_fingerprint": self.teacher_fingerprint,
            "xmodal_version": __version__,
        }

    def save(self, snapshot: _Snapshot | None = None) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call)."""
        state = self.state_dict(snapshot)
        path = None
        if self.rank == 0:
            path = self.ckpts.save(state, self.step)
            log.info("saved checkpoint %s", path)
        barrier()
        self.saved_step, self.saved_path = self.step, path
        return path

    def load_state_dict(self, ckpt: Mapping[str, Any], path: Path) -> None:
        try:
            unwrap(self.student).load_state_dict(ckpt["model"])
            self.losses.load_state_dict(ckpt["losses"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot restore {path} into this model: {e}") from e
        self.step = int(ckpt["step"])
        self._apply_schedule()
        self.stream.load_state(ckpt["data"])
        per_rank = ckpt.get("rng_per_rank") or []
        if len(per_rank) == self.world and self.world > 1:
            restore_rng(per_rank[self.rank])
        else:
            restore_rng(ckpt["rng"])
            if self.world != int(ckpt.get("world_size", 1)):
                log.warning("resuming with %d processes, checkpoint had %s: per-process RNG streams are re-derived",
                            self.world, ckpt.get("world_size"))
                if self.rank:
                    seed_everything(self.cfg.seed + self.rank + 1000 * self.step)

    def _apply_schedule(self) -> None:
        """Learning rates at the restored step from this run's config (train.lr, warmup_steps and steps may differ
        from the checkpoint's); with an unchanged config these are exactly the rates the checkpoint holds."""
        sched = self.scheduler
        sched.base_lrs = [float(self.cfg.lr) for _ in self.optimizer.param_groups]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["initial_lr"], group["lr"] = float(self.cfg.lr), lr
        sched._last_lr = list(lrs)

    def _find_resume(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The checkpoint to resume from: an explicit path as given, else the newest intact one of this run."""
        if not self.resume:
            return None, None
        if str(self.resume) not in (RESUME_LATEST, RESUME_AUTO):
            path = self.ckpts.resolve(self.resume)
            return load_checkpoint(path), path
        candidates = [step_path(self.ckpts.folder, s) for s in reversed(self.ckpts.steps())]
        if not candidates:
            if str(self.resume) == RESUME_AUTO:
                log.info("no checkpoint in %s yet: starting a new run", self.ckpts.folder)
                return None, None
            raise CheckpointError(
                f"nothing to resume in {self.run.path}: it holds no checkpoint (no step_*.pt in "
                f"{self.ckpts.folder}). To start a new run there, leave out --resume (resume: null); to continue "
                "another run, point run_dir at its folder"
            )
        damaged: list[Path] = []
        for path in candidates:
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                log.warning("%s; trying the previous checkpoint", e)
                damaged.append(path)
                continue
            if damaged:
                self._set_aside(damaged)
                log.warning("resuming from %s, the newest intact checkpoint, instead of the damaged %s (kept as "
                            "*.damaged)", path.name, ", ".join(p.name for p in damaged))
            return ckpt, path
        raise CheckpointError(
            f"cannot resume in {self.run.path}: every checkpoint is damaged ({', '.join(p.name for p in damaged)}); "
            "start a new run folder"
        )

    def _set_aside(self, paths: Sequence[Path]) -> None:
        """Rename damaged checkpoints out of the step_*.pt pattern, so neither resume nor pruning picks them."""
        if self.rank != 0:
            return
        for p in paths:
            try:
                os.replace(p, p.with_name(p.name + ".damaged"))
            except OSError as e:
                log.warning("could not rename damaged checkpoint %s: %s", p, e)

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.rank == 0:
            self.ckpts.remove_stale_temps()
            self.run.remove_stale_temps()
        ckpt, path = self._find_resume()
        if ckpt is not None and path is not None:
            check_resume_compatible(ckpt, path, self.config, self.teacher_fingerprint, self.resume_may_change)
            retuned = []
            if self.config is not None and ckpt.get("config") is not None:
                retuned = retuned_settings(ckpt["config"], self.config, (*RESUME_MAY_RETUNE, "train.steps"))
            self.load_state_dict(ckpt, path)
            self.saved_step, self.saved_path = self.step, path
            if retuned:
                log.warning("resuming with changed training settings, in effect from step %d: %s", self.step + 1,
                            "; ".join(retuned))
            self.run.truncate_metrics(self.step)
            log.info("resumed from %s at step %d", path, self.step)
        else:
            existing = self.ckpts.latest()
            if existing is not None:
                raise CheckpointError(
                    f"{self.run.path} already holds checkpoints ({existing.name}); continue that run with "
                    "--resume (resume: latest), or choose a new run folder"
                )
            self.run.truncate_metrics(0)  # rows of an earlier attempt that died before its first checkpoint
            seed_everything(self.cfg.seed + self.rank)
        self.run.write_config(self.config)

    # ------------------------------------------------------------ one optimizer step

    def _snapshot(self) -> _Snapshot:
        """The state a failed or interrupted step must not leak into a checkpoint (buffer copies reuse storage)."""
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, b in self.objective.named_buffers():
                s = self._buffer_store.get(name)
                if s is None or s.shape != b.shape or s.dtype != b.dtype or s.device != b.device:
                    s = torch.empty_like(b)
                s.copy_(b)
                store[name] = s
        self._buffer_store = store
        return _Snapshot(capture_rng(), self.stream.state(), self.step, store)

    def _restore_buffers(self, snap: _Snapshot) -> None:
        """Put module buffers (BatchNorm statistics) back as they were before the unfinished step."""
        with torch.no_grad():
            for name, b in self.objective.named_buffers():
                s = snap.buffers.get(name)
                if s is not None and s.shape == b.shape:
                    b.copy_(s)

    def _non_finite_buffers(self, snap: _Snapshot) -> dict[str, float]:
        """Floating-point buffers that this step made NaN or infinite (e.g. BatchNorm statistics of a diverging
        forward pass). Values that were non-finite before the step (a -inf attention mask) are by design."""
        names, flags = [], []
        for name, b in self.objective.named_buffers():
            if not b.is_floating_point() or not b.numel():
                continue
            bad = ~torch.isfinite(b)
            before = snap.buffers.get(name)
            if before is not None and before.shape == b.shape:
                bad &= torch.isfinite(before)
            names.append(name)
            flags.append(bad.any().to(self.device))
        if not flags:
            return {}
        hits = torch.stack(flags).tolist()
        if not any(hits):
            return {}
        buffers = dict(self.objective.named_buffers())
        out = {}
        for name, hit in zip(names, hits):
            if hit:
                b = buffers[name].detach()
                out[f"buffer:{name}"] = float(b[~torch.isfinite(b)].flatten()[0])
        return out

    def _optimizer_step(self, snap: _Snapshot | None = None) -> tuple[dict[str, float], int, float]:
        """Accumulate `grad_accum` micro-batches, clip, step; returns mean loss parts, samples, grad norm.

        Nothing is updated when the loss, the gradient norm or a buffer (compared with `snap`) is not finite.
        """
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        samples = 0
        for i in range(cfg.grad_accum):
            batch = next(self.stream)
            samples += batch_size_of(batch) * self.world
            last = i == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                out = compute_loss(self.model, self.teacher, batch, self.device, cfg.precision)
                keys = list(out.parts)
                values = torch.stack([out.loss.detach().float()] + [out.parts[k].float().mean() for k in keys])
                values = values.tolist()
                named = dict(zip(["loss", *[f"loss/{k}" for k in keys]], values))
                if any_rank(not math.isfinite(values[0]), self.device):
                    raise _NonFinite(named)
                (out.loss / cfg.grad_accum).backward()
            for k, v in named.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        if cfg.clip_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm)
        else:
            norm = total_norm([p.grad for p in self.params if p.grad is not None])
        norm = float(norm)
        bad_buffers = self._non_finite_buffers(snap) if snap is not None else {}
        if any_rank(not math.isfinite(norm) or bool(bad_buffers), self.device):
            raise _NonFinite({**sums, "grad_norm": norm, **bad_buffers})
        sums["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        self._updating = True
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._updating = False
        return sums, samples, norm

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Run the evaluator on rank 0 (student in eval mode, no grad, training RNG untouched) and log it."""
        if self.evaluator is None:
            return {}
        metrics: dict[str, float] = {}
        if self.rank == 0:
            rng = capture_rng()
            student = unwrap(self.student)
            was_training = student.training
            student.eval()
            try:
                with torch.no_grad():
                    result = self.evaluator(student)
            finally:
                student.train(was_training)
                restore_rng(rng)
            metrics = {f"eval/{k}": float(v) for k, v in dict(result or {}).items()}
            self.run.log({"step": self.step, **metrics})
            log.info("step %d eval: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        barrier()
        self.last_eval = metrics
        return metrics

    # ------------------------------------------------------------ fit

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to `cfg.steps` (or stop after step `until`, saving a checkpoint to resume from); final metrics.

        The run folder is locked meanwhile (by rank 0): another process writing into it is refused.
        """
        with contextlib.ExitStack() as stack:
            refused: LockedError | None = None
            if self.rank == 0:
                try:
                    stack.enter_context(run_folder_lock(self.run.path))
                except LockedError as e:
                    refused = e
            if any_rank(refused is not None, self.device):
                raise refused or LockedError(f"run folder {self.run.path} is in use by another run", None)
            return self._fit(until)

    def _fit(self, until: int | None) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._start()
        target = cfg.steps if until is None else min(int(until), cfg.steps)
        self.objective.train()
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", unit="step", dynamic_ncols=True,
                   disable=(not self.progress or self.rank != 0) or None)
        window: dict[str, float] = {}
        window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        first_step, fit_start = self.step, time.perf_counter()
        snap = None
        try:
            while self.step < target:
                snap = self._snapshot()
                parts, samples, norm = self._optimizer_step(snap)
                snap = None
                bar.update(1)
                for k, v in parts.items():
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
                window_samples += samples
                if self.step % max(1, cfg.log_every) == 0 or self.step == target:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    means = all_reduce_mean({k: v / window_steps for k, v in window.items()}, self.device)
                    means["lr"] = parts["lr"]
                    record = {"step": self.step, "epoch": self.stream.epoch, **means, "grad_norm": norm,
                              "samples_per_s": window_samples / elapsed}
                    self.run.log(record)
                    self.last_train = record
                    bar.set_postfix(_postfix(record), refresh=False)
                    if bar.disable and self.rank == 0:  # no bar (output is not a terminal): a line instead
                        rate = (self.step - first_step) / max(time.perf_counter() - fit_start, 1e-9)
                        log.info("%s", _progress_line(record, target, rate))
                    window, window_steps, window_samples, window_start = {}, 0, 0, time.perf_counter()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
        except _NonFinite as e:
            bar.close()
            raise self._non_finite(e.parts, snap) from None
        except BaseException as e:  # Ctrl-C, a data error, a failing evaluator...: keep the steps done so far
            bar.close()
            self._save_on_failure(e, snap)
            raise
        bar.close()
        if self.saved_step != self.step:
            self.save()
        if self.step >= cfg.steps and self.evaluator is not None and not (
            cfg.eval_every and self.step % cfg.eval_every == 0
        ):
            self.evaluate()
        return {**self.last_train, **self.last_eval, "step": self.step,
                "checkpoint": str(self.saved_path) if self.saved_path else None,
                "skipped_samples": len(self.stream.gather_skipped_keys())}

    def _save_on_failure(self, error: BaseException, snap: _Snapshot | None) -> None:
        """Save the last completed step before an error or Ctrl-C propagates (one process only: under DDP the
        other processes may be anywhere, so only a non-finite loss, which every rank agrees on, saves)."""
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else f"stopped by {type(error).__name__}"
        if self._updating:  # a partial parameter update is not a state worth keeping
            log.warning("%s during the parameter update: that state is not saved; the last checkpoint is %s", what,
                        self.saved_path)
            return
        if snap is not None and snap.step == self.step:
            self._restore_buffers(snap)  # the unfinished step's forward passes already changed them
        else:
            snap = None  # the step completed: the current state is the one to keep
        if self.step == 0 or self.saved_step == self.step:
            return
        if self.world > 1:
            log.warning("%s: step %d is not saved (other processes may be elsewhere); the last checkpoint is %s",
                        what, self.step, self.saved_path)
            return
        try:
            path = self.save(snap)
        except Exception as e:  # noqa: BLE001 - the original error is what propagates
            log.error("%s, and saving the last completed step (%d) failed too: %s", what, self.step, e)
            return
        log.warning("%s: saved the last completed step (%d) to %s; continue with --resume", what, self.step, path)

    def _non_finite(self, parts: Mapping[str, float], snap: _Snapshot | None) -> NonFiniteLossError:
        failing = self.step + 1
        if snap is not None:
            self._restore_buffers(snap)  # the failing forward passes already moved BatchNorm statistics
        if self.step > 0 and self.saved_step != self.step:
            self.save(snap)  # parameters and optimizer are untouched by the failing step: the last good state
        bad = {k: v for k, v in parts.items() if not math.isfinite(v)}
        named = ", ".join(
            f"buffer '{k.removeprefix('buffer:')}' = {v}" if k.startswith("buffer:") else f"'{k}' = {v}"
            for k, v in bad.items()
        ) or "the total loss"
        cfg = self.cfg
        fixes = [f"lower train.lr (now {cfg.lr:g})", f"raise train.warmup_steps (now {cfg.warmup_steps})"]
        if not cfg.clip_grad_norm:
            fixes.append("set train.clip_grad_norm (e.g. 1.0)")
        if cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(self.device)):
            fixes.append("set train.precision: fp32 (bf16 autocast is in use)")
        advice = ", ".join(fixes[:-1]) + f" or {fixes[-1]}"
        if self.saved_path is not None and self.saved_step == self.step:
            where = f"; the last good checkpoint (step {self.step}) is {self.saved_path}"
            then = ("then resume with --resume (train.lr, warmup_steps, clip_grad_norm and precision may change on "
                    "resume)")
        else:
            where = "" if self.step else "; no step was completed, so there is no checkpoint"
            then = "then start the run again" if not self.step else "then resume with --resume"
        message = f"non-finite value at step {failing}: {named}{where}. {advice[0].upper()}{advice[1:]}, {then}"
        return NonFiniteLossError(message, failing, bad, self.saved_path if self.saved_step == self.step else None)


def total_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The 2-norm of all `tensors` together (what clip_grad_norm_ measures), without torch>=2.6 helpers."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    norms = [torch.linalg.vector_norm(t.detach(), 2.0, dtype=torch.float32).to(device) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def _progress_line(record: Mapping[str, Any], target: int, steps_per_s: float) -> str:
    """One progress line for logs (when there is no progress bar): step, loss, lr, throughput and ETA."""
    step = int(record["step"])
    eta_text = "?"
    if steps_per_s > 0:
        hours, rest = divmod(int(round((target - step) / steps_per_s)), 3600)
        eta_text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return (f"step {step}/{target}  loss {record.get('loss', float('nan')):.4g}  lr {record.get('lr', 0.0):.3g}  "
            f"{record.get('samples_per_s', 0.0):.1f} samples/s  ETA {eta_text}")


def _postfix(record: Mapping[str, Any]) -> dict[str, str]:
    """Short progress-bar fields: total loss, top-level loss parts, throughput."""
    out = {}
    for k, v in record.items():
        if k == "loss" or (k.startswith("loss/") and k.count("/") == 1):
            out[k.removeprefix("loss/")] = f"{v:.4g}"
    out["samples/s"] = f"{record.get('samples_per_s', 0.0):.1f}"
    return out


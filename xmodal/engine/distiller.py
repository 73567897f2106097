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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.config import TrainConfig
from xmodal.device import autocast, seed_everything
from xmodal.distributed import rank, world_size
from xmodal.engine.cache import TeacherCache
from xmodal.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUME_MAY_CHANGE,
    CheckpointManager,
    capture_rng,
    check_resume_compatible,
    load_checkpoint,
    plain_config,
    restore_rng,
)
from xmodal.engine.data import BatchStream, to_device
from xmodal.engine.ddp import all_reduce_mean, any_rank, barrier, gather_objects, init_distributed, unwrap, wrap_ddp
from xmodal.engine.run import RunDir
from xmodal.engine.schedule import build_optimizer, build_scheduler
from xmodal.errors import CheckpointError, ConfigError, XmodalError
from xmodal.features import Features
from xmodal.losses import LossOutput, LossSet

log = logging.getLogger(__name__)

Outputs = Mapping[str, Features]
Teacher = Callable[[Mapping[str, Any]], Outputs]
Evaluator = Callable[[nn.Module], Mapping[str, float]]


class NonFiniteLossError(XmodalError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is on disk."""

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
    """What a checkpoint needs besides the modules: taken at the start of each step (last good state)."""

    rng: dict[str, Any]
    data: dict[str, int]


class Distiller:
    """Train `student` against `losses` (and a frozen `teacher`, cached or online) for `cfg.steps` steps.

    data: a map-style Dataset (the engine builds a resumable, rank-aware loader; batch_size is global) or any
    iterable of batch dicts (resume then skips batches). `config` is the resolved job config (saved in each
    checkpoint; a resume with a different one is refused unless only keys in `resume_may_change` differ).
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

        self.run = RunDir(run_dir)
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

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        path = self.ckpts.resolve(self.resume) if self.resume else None
        if self.resume and path is None:
            log.debug("resume=%s: no checkpoint in %s yet, starting a new run", self.resume, self.ckpts.folder)
        if path is not None:
            ckpt = load_checkpoint(path)
            check_resume_compatible(ckpt, path, self.config, self.teacher_fingerprint, self.resume_may_change)
            self.load_state_dict(ckpt, path)
            self.saved_step, self.saved_path = self.step, path
            log.info("resumed from %s at step %d", path, self.step)
        else:
            existing = self.ckpts.latest()
            if existing is not None:
                raise CheckpointError(
                    f"{self.run.path} already holds checkpoints ({existing.name}); continue that run with "
                    "--resume (resume: latest), or choose a new run folder"
                )
            seed_everything(self.cfg.seed + self.rank)
        if self.rank == 0:
            self.ckpts.remove_stale_temps()
        self.run.write_config(self.config)

    # ------------------------------------------------------------ one optimizer step

    def _optimizer_step(self) -> tuple[dict[str, float], int, float]:
        """Accumulate `grad_accum` micro-batches, clip, step; returns mean loss parts, samples, grad norm."""
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
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm = float(norm)
        if any_rank(not math.isfinite(norm), self.device):
            raise _NonFinite({**sums, "grad_norm": norm})
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
        """Train to `cfg.steps` (or stop after step `until`, saving a checkpoint to resume from); final metrics."""
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
        snap = None
        try:
            while self.step < target:
                snap = _Snapshot(capture_rng(), self.stream.state())
                parts, samples, norm = self._optimizer_step()
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
                    window, window_steps, window_samples, window_start = {}, 0, 0, time.perf_counter()
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save()
        except _NonFinite as e:
            bar.close()
            raise self._non_finite(e.parts, snap) from None
        except KeyboardInterrupt:
            bar.close()
            # Save the last completed step, unless the interrupt hit the parameter update itself (a partial
            # update is not a state worth keeping) or other processes may be elsewhere.
            if self.world == 1 and not self._updating and self.saved_step != self.step:
                path = self.save(snap)
                log.warning("interrupted: saved the last completed step to %s", path)
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

    def _non_finite(self, parts: Mapping[str, float], snap: _Snapshot | None) -> NonFiniteLossError:
        failing = self.step + 1
        if self.saved_step != self.step:
            self.save(snap)  # modules are untouched by the failing step: this is the last good state
        bad = {k: v for k, v in parts.items() if not math.isfinite(v)}
        named = ", ".join(f"'{k}' = {v}" for k, v in bad.items()) or "the total loss"
        where = f"; the last good checkpoint (step {self.step}) is {self.saved_path}" if self.saved_path else ""
        message = (
            f"non-finite value at step {failing}: {named}{where}. Lower train.lr, raise warmup_steps, set "
            "train.clip_grad_norm, or use precision: fp32, then resume"
        )
        return NonFiniteLossError(message, failing, bad, self.saved_path)


def _postfix(record: Mapping[str, Any]) -> dict[str, str]:
    """Short progress-bar fields: total loss, top-level loss parts, throughput."""
    out = {}
    for k, v in record.items():
        if k == "loss" or (k.startswith("loss/") and k.count("/") == 1):
            out[k.removeprefix("loss/")] = f"{v:.4g}"
    out["samples/s"] = f"{record.get('samples_per_s', 0.0):.1f}"
    return out


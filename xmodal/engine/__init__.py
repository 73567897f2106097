"""Training engine: the distillation loop, checkpoints and resume, the teacher cache, multi-process runs.

A job hands the engine five things and calls `fit()`:

    from xmodal.engine import Distiller
    from xmodal.losses import build_losses

    student = MyStudent()                       # nn.Module: forward(batch) -> {"image": Features, "text": Features}
    teacher = MyTeacher()                       # callable batch -> {modality: Features}; frozen by the engine
    fp = fingerprint(teacher_model, preprocess_cfg, data=data_identity({"train": csv}))  # xmodal.fingerprint
    losses = build_losses(cfg.losses)           # LossSet; its parameters (temperatures) train with the student
    result = Distiller(student, losses, train_dataset, cfg.train, cfg.run_dir,
                       teacher=teacher,         # or a TeacherCache / cache folder path, or None (no teacher)
                       evaluator=lambda s: {"recall@1": ...},   # optional, student -> metrics
                       config=cfg, teacher_fingerprint=fp, resume=cfg.resume).fit()

The contract:

- Batches are dicts of tensors and lists. A map-style data set (items are dicts, collated by `collate_samples`,
  which turns each item's `id` into the batch's `ids`) gets a resumable, rank-aware loader built by the engine,
  with `cfg.batch_size` the global batch over all processes; any other iterable is used as is.
- Data (`xmodal.engine.data`): randomness is a pure function of (seed, sample key, epoch); the engine calls the
  data set's `set_epoch` in the process that loads each item (persistent workers included) and resume restores
  the epoch. Samples are keyed by `sample_key` (id or path), never by row. An item that returns None (unreadable)
  is replaced by another chosen from (seed, index, epoch), so every rank's batch keeps its size; skipped keys are
  counted (`fit()` reports `skipped_samples`) and kept in checkpoints.
- The student returns aligned outputs (its adapters and projections live inside it). The teacher runs under
  `torch.inference_mode()` (eval mode, no grads, not in the optimizer); a `TeacherCache` is looked up by
  `batch["ids"]` and `batch.get("aug_index")`. Supervised terms (e.g. CTC) are registry losses reading `batch`:
  the engine only calls `losses(student_out, teacher_out, batch)`.
- Each optimizer step accumulates `cfg.grad_accum` micro-batches (batch-level losses see one micro-batch).
- `run_dir/` gets `config.yaml`, `metrics.jsonl` (train records every `log_every` steps, `eval/...` records every
  `eval_every`), and `checkpoints/step_XXXXXXX.pt` (+ `latest`), written atomically by rank 0, each ending in a
  blake2b checksum checked on load. While `fit()` runs the folder is locked: a second writer is refused. With
  `train.report_to: [tensorboard]` every numeric metric also goes to `run_dir/tensorboard/`.
- Resume: None starts a new run (refused if the folder holds checkpoints); "latest" takes the newest intact
  checkpoint (a damaged one is set aside as `*.damaged` and the one before used) and is an error when there is
  none; "auto" continues if there is one and starts otherwise; a path (a step file or a run folder) resumes from
  there. Weights, optimizer, scheduler, RNG, data position and epoch come back and metrics rows past the step are
  dropped: the result equals an uninterrupted run (bit-exact on CPU with `num_workers: 0`). Another teacher
  fingerprint or a config that differs outside `RESUME_MAY_CHANGE` is refused with the differences; train.lr,
  warmup_steps, clip_grad_norm and precision may change (logged, applied from the resumed step).
- Module buffers (BatchNorm statistics) are snapshotted at each step: a failed or interrupted step never leaks
  them into a checkpoint. A NaN/inf loss, gradient norm or buffer raises `NonFiniteLossError` naming the step and
  the values, after saving the last good step; other errors and Ctrl-C save the last completed step (in a single
  process; under DDP the last checkpoint stands).
- Under `torchrun`, the engine joins the process group (NCCL/gloo), wraps student + losses in DDP; losses that
  gather over ranks (affinity, clip) then give exactly the single-process loss and gradients.
- Multi-stage jobs record each stage's identity, status and final checkpoint in `run_dir/stages.json`
  (`xmodal.engine.stages.StageRun`): finished stages are skipped on resume, the interrupted one continues.

Teacher cache: `build_cache(teacher, dataset, out_dir, fingerprint)` / `xmodal cache CONFIG` (jobs register
`@register_cache_source("job")` returning a `CacheSource`), read with `TeacherCache(path, fingerprint=fp)`.
For benchmarks and custom loops, `compute_loss` and `train_step` are the engine's step as functions.
"""

from xmodal.engine.cache import (
    CACHE_SOURCES,
    CacheSource,
    TeacherCache,
    build_cache,
    open_cache,
    register_cache_source,
)
from xmodal.engine.checkpoint import (
    RESUME_MAY_CHANGE,
    CheckpointManager,
    capture_rng,
    check_resume_compatible,
    config_differences,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from xmodal.engine.data import BatchStream, ResumableBatchSampler, collate_samples, to_device
from xmodal.engine.ddp import init_distributed, unwrap, wrap_ddp
from xmodal.engine.distiller import (
    Distiller,
    NonFiniteLossError,
    Objective,
    compute_loss,
    teacher_outputs,
    train_step,
)
from xmodal.engine.run import RunDir, read_metrics
from xmodal.engine.schedule import WarmupCosine, build_optimizer, build_scheduler

__all__ = [
    "CACHE_SOURCES",
    "RESUME_MAY_CHANGE",
    "BatchStream",
    "CacheSource",
    "CheckpointManager",
    "Distiller",
    "NonFiniteLossError",
    "Objective",
    "ResumableBatchSampler",
    "RunDir",
    "TeacherCache",
    "WarmupCosine",
    "build_cache",
    "build_optimizer",
    "build_scheduler",
    "capture_rng",
    "check_resume_compatible",
    "collate_samples",
    "compute_loss",
    "config_differences",
    "init_distributed",
    "load_checkpoint",
    "open_cache",
    "read_metrics",
    "register_cache_source",
    "restore_rng",
    "save_checkpoint",
    "teacher_outputs",
    "to_device",
    "train_step",
    "unwrap",
    "wrap_ddp",
]

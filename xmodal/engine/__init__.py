"""Training engine: the distillation loop, checkpoints and resume, the teacher cache, multi-process runs.

A job hands the engine five things and calls `fit()`:

    from xmodal.engine import Distiller
    from xmodal.losses import build_losses

    student = MyStudent()                       # nn.Module: forward(batch) -> {"image": Features, "text": Features}
    teacher = MyTeacher()                       # callable batch -> {modality: Features}; frozen by the engine
    fp = model_fingerprint(teacher_model, extra=preprocess_cfg)   # xmodal.fingerprint
    losses = build_losses(cfg.losses)           # LossSet; its parameters (temperatures) train with the student
    result = Distiller(student, losses, train_dataset, cfg.train, cfg.run_dir,
                       teacher=teacher,         # or a TeacherCache / cache folder path, or None (no teacher)
                       evaluator=lambda s: {"recall@1": ...},   # optional, student -> metrics
                       config=cfg, teacher_fingerprint=fp, resume=cfg.resume).fit()

The contract:

- Batches are dicts of tensors and lists. A map-style data set (items are dicts, collated by `collate_samples`,
  which turns each item's `id` into the batch's `ids`) gets a resumable, rank-aware loader built by the engine,
  with `cfg.batch_size` the global batch over all processes; any other iterable is used as is.
- The student returns aligned outputs (its adapters and projections live inside it). The teacher runs under
  `torch.inference_mode()` (eval mode, no grads, not in the optimizer); a `TeacherCache` is looked up by
  `batch["ids"]` and `batch.get("aug_index")`. Supervised terms (e.g. CTC) are registry losses reading `batch`:
  the engine only calls `losses(student_out, teacher_out, batch)`.
- Each optimizer step accumulates `cfg.grad_accum` micro-batches (batch-level losses see one micro-batch).
- `run_dir/` gets `config.yaml`, `metrics.jsonl` (train records every `log_every` steps, `eval/...` records every
  `eval_every`), and `checkpoints/step_XXXXXXX.pt` (+ `latest`), written atomically by rank 0.
- Resume (`resume="latest"` or a path) restores weights, optimizer, scheduler, RNG and data position: the result
  equals an uninterrupted run (bit-exact on CPU with `num_workers: 0`). A different teacher fingerprint or a
  config that differs outside `RESUME_MAY_CHANGE` (steps, logging, device...) is refused with the differences.
- A NaN/inf loss or gradient norm raises `NonFiniteLossError` naming the step and the loss parts, after saving
  the last good step.
- Under `torchrun`, the engine joins the process group (NCCL/gloo), wraps student + losses in DDP; losses that
  gather over ranks (affinity, clip) then give exactly the single-process loss and gradients.

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

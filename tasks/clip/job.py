"""The `clip_distill` job: (train the teacher,) build students by shrinking + inheritance, distil stage by stage.

Run folder: `config.yaml`, `metrics.jsonl`, `checkpoints/`, `student_open_clip.json` (for `xmodal export`),
`results.json`; a trained teacher lives in `teacher/<settings hash>/open_clip` and is reused when unchanged;
earlier progressive stages live in `stages/<k>/`, and `stages.json` records each stage's plan, status and final
checkpoint, so `--resume` skips finished stages and continues the interrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.config import LossSpec, TrainConfig, register_job, to_dict
from xmodal.data.image_text import read_records
from xmodal.data.shards import ShardDataset, ShardLoader, ShardRecords
from xmodal.device import seed_everything
from xmodal.engine.cache import CacheSource, register_cache_source
from xmodal.engine.checkpoint import RESUME_AUTO
from xmodal.engine.ddp import init_distributed
from xmodal.engine.stages import DONE, Stage, StageRun, train_identity
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.fingerprint import data_identity, fingerprint, hash_json
from xmodal.io import atomic_write_json
from xmodal.models import create_teacher
from xmodal.openclip import ClipBundle, bundle_model
from xmodal.tasks.clip.config import AutoInheritConfig, ClipDistillConfig, DataConfig, TeacherConfig
from xmodal.tasks.clip.data import (
    PairedViews,
    RecordedViews,
    View,
    ViewRecipe,
    ViewRenderer,
    collate_skipping,
    same_pipeline,
)
from xmodal.tasks.clip.models import ClipStudent, ClipTeacher, check_losses

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data


@dataclass
class DataPaths:
    train: Path | None
    val: Path | None
    test: Path | None
    zeroshot: Path | None
    shards: list[str] | None = None  # training shard files (data.shards), in place of `train`


def resolve_data(cfg: DataConfig) -> DataPaths:
    """Absolute data paths; generates the synthetic world into `root` first when configured and missing."""
    root = Path(cfg.root) if cfg.root else None
    if cfg.synthetic is not None:
        if root is None:
            raise ConfigError("data.synthetic needs data.root: the folder to generate the synthetic world into")
        from xmodal.data.scenes import generate_scene_dataset
        from xmodal.engine.ddp import main_process_first

        s = cfg.synthetic
        with main_process_first():  # under torchrun rank 0 writes the world; the others then find it there
            generate_scene_dataset(root, s.train, s.val, s.test, seed=s.seed, image_size=s.image_size,
                                   captions_per_image=s.captions_per_image)

    def path(name: str | None) -> Path | None:
        if name is None:
            return None
        p = Path(name)
        return p if p.is_absolute() or root is None else root / p

    paths = DataPaths(path(cfg.train), path(cfg.val), path(cfg.test), path(cfg.zeroshot))
    if cfg.shards is not None:
        from xmodal.data.shards import shard_paths

        paths.train, paths.shards = None, shard_paths(cfg.shards, root)
    elif not paths.train.is_file():
        raise ConfigError(f"data.train: {paths.train} does not exist (set data.root or give a CSV/JSON-lines path)")
    if paths.zeroshot is not None and not paths.zeroshot.is_file():
        paths.zeroshot = None
    return paths


def train_data_identity(paths: DataPaths):
    """What the teacher's outputs depend on besides the teacher: the training file's content and its images, or
    the training shards' paths, sizes and modification times."""
    if paths.shards is not None:
        from xmodal.data.shards import shard_identity

        return data_identity(shards=shard_identity(paths.shards))
    return data_identity({"train": paths.train}, media=[r.image for r in read_records(paths.train)])


def paired_dataset(path: Path, views: list[View], cfg: DataConfig, seed: int = 0) -> PairedViews:
    """The training pairs in each model's pipeline; caption choice and augmentation follow (seed, key, epoch)."""
    from xmodal.data.image_text import ImageTextDataset

    base = ImageTextDataset(path, transform=None, tokenizer=None, on_error=cfg.on_error,
                            caption_sampling=cfg.caption_sampling, seed=seed)
    return PairedViews(base, views)


class _StreamItem:
    """PairedViews' base for a stream: the one item handed to `StreamViews`."""

    item: dict | None = None

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict | None:
        return self.item


class StreamViews:
    """Each model's pipeline (PairedViews, as for the CSV data) on one streamed {"id", "image", "text"} item, with
    the same (seed, key, epoch) randomness: the `item_fn` of a ShardDataset."""

    def __init__(self, views: list[View], seed: int):
        self.paired = PairedViews(_StreamItem(), views, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.paired.set_epoch(epoch)

    def __call__(self, item: dict, seed: int) -> dict:
        self.paired.base.item = item
        return self.paired[0]


class ClipShardLoader(ShardLoader):
    """A ShardLoader whose items pass through PairedViews (`StreamViews`), so per-item settings made on the
    training data (`share_views`) apply to the stream as to the CSV data set."""

    def __init__(self, dataset: ShardDataset, views: StreamViews, *, pin_memory: bool = False):
        super().__init__(dataset, pin_memory=pin_memory)
        self.paired = views.paired

    def share_views(self, *args: Any, **kwargs: Any) -> ClipShardLoader:
        self.paired.share_views(*args, **kwargs)
        return self


def training_data(paths: DataPaths, views: list[View], cfg: DataConfig, train: TrainConfig, *,
                  rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """The training pairs for the engine: map-style over `data.train`, or this rank's shard stream over
    `data.shards` (`train.num_workers` loader workers; see xmodal/data/shards.py)."""
    if paths.shards is None:
        return paired_dataset(paths.train, views, cfg, seed=train.seed)
    if train.batch_size % world_size:
        raise ConfigError(f"train.batch_size {train.batch_size} must be divisible by the number of processes "
                          f"{world_size}")
    item_fn = StreamViews(views, train.seed)
    shards = ShardDataset(paths.shards, train.batch_size // world_size, rank=rank, world_size=world_size,
                          num_workers=train.num_workers, seed=train.seed, caption_sampling=cfg.caption_sampling,
                          image_keys=cfg.shard_image_keys, caption_key=cfg.shard_caption_key,
                          shuffle_buffer=cfg.shard_shuffle, on_error=cfg.on_error, item_fn=item_fn,
                          collate_fn=collate_skipping)
    return ClipShardLoader(shards, item_fn, pin_memory=pin_memory)


# ---------------------------------------------------------------- models


ClipModel = ClipBundle  # the one bundle type of open_clip models: model, transforms, tokenizer, configs, identity


def wrap_open_clip(model: nn.Module, model_cfg: dict) -> ClipModel:
    """Pipelines and tokenizer for a model built from a model_cfg (its own image size and context length)."""
    return bundle_model(model, model_cfg)


def load_clip(spec, device: torch.device) -> ClipModel:
    """An open_clip model from a name/folder (+ pretrained) or a model_cfg (randomly initialised), trainable."""
    return create_teacher(spec, kind="open_clip", device=device, frozen=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- evaluation


def make_evaluator(clip_model: ClipModel, paths: DataPaths, split: str, batch_size: int, zeroshot: bool,
                   device: torch.device):
    """student → metrics: retrieval on the split (both directions) and zero-shot top-1/top-5 when available."""
    data = paths.val if split == "val" else paths.test
    if data is None or not data.is_file():
        return None

    def evaluate(_student: nn.Module | None = None) -> dict[str, float]:
        return evaluate_clip(clip_model, data, paths.zeroshot if zeroshot else None, batch_size, device)

    return evaluate


def evaluate_clip(clip_model: ClipModel, data: Path, zeroshot: Path | None, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    from xmodal.tasks.retrieval.encode import encode_image_text
    from xmodal.tasks.retrieval.evaluate import evaluate_retrieval

    model = clip_model.model
    was_training = model.training
    model.eval()
    try:
        emb = encode_image_text(clip_model.loaded(), data, cache_dir=None, batch_size=batch_size, device=device,
                                progress=False)
        metrics = evaluate_retrieval(emb.image, emb.text, emb.text_to_image, ks=(1, 5, 10))
        if zeroshot is not None:
            from xmodal.tasks.zeroshot import read_zeroshot_file, run_zeroshot

            zs = run_zeroshot(model, clip_model.eval_transform, clip_model.tokenizer, read_zeroshot_file(zeroshot),
                              device=device, batch_size=batch_size)
            metrics.update({f"zeroshot_{k}": v for k, v in zs.items() if k in ("top1", "top5")})
    finally:
        model.train(was_training)
    return metrics


@torch.no_grad()
def image_throughput(model: nn.Module, image_size: int, device: torch.device, batch: int = 64, reps: int = 3) -> float:
    """Images per second through the image tower (eval mode, one batch size), for comparison tables."""
    model.eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    model.encode_image(x)
    start = time.perf_counter()
    for _ in range(reps):
        model.encode_image(x)
    return batch * reps / (time.perf_counter() - start)


# ---------------------------------------------------------------- training pieces


def train_clip(clip_model: ClipModel, paths: DataPaths, data_cfg: DataConfig, train: TrainConfig, run_dir: Path,
               *, losses: list[LossSpec], teacher: ClipModel | None = None, evaluator=None, config: Any = None,
               resume: str | None = None, projection: str | None = None, device: torch.device,
               teacher_cache: str | None = None, views: ViewRecipe | None = None) -> dict:
    """One engine run: `clip_model` learns from `teacher` (or from the captions alone when teacher is None).

    With `teacher_cache` (a folder from `xmodal cache`), the teacher's outputs are read instead of computed; a
    cache with recorded views replays them. `views` without a cache: teacher and student share online views.
    """
    from xmodal.engine import Distiller, TeacherCache
    from xmodal.losses import build_losses

    views_ = [View(clip_model.train_transform, clip_model.tokenizer, render=ViewRenderer(clip_model.preprocess_cfg))]
    teacher_fn = None
    teacher_fp = None
    if teacher is not None:
        t_view = View(teacher.eval_transform, teacher.tokenizer, render=ViewRenderer(teacher.preprocess_cfg))
        if not same_pipeline(t_view.transform, views_[0].transform):
            t_view.image_key = "teacher_image"
        if not same_pipeline(t_view.tokenizer, views_[0].tokenizer):
            t_view.text_key = "teacher_text"
        if (t_view.image_key, t_view.text_key) != ("image", "text"):
            views_.append(t_view)
        teacher_fn = ClipTeacher(teacher.model, t_view.image_key, t_view.text_key, extra=teacher.preprocess_cfg)
        teacher_fp = fingerprint(teacher_fn.fingerprint, data=train_data_identity(paths))
        dim = teacher_fn.dim
    else:
        from xmodal.adapters import clip_embed_dim

        dim = clip_embed_dim(clip_model.model)
    student = ClipStudent(clip_model.model, dim, projection).to(device)
    cache = None
    if teacher_cache is not None:
        views_ = views_[:1]  # the cache replaces the teacher's inputs
        cache = TeacherCache(teacher_cache, fingerprint=teacher_fp)
    from xmodal.distributed import rank, world_size

    dataset = training_data(paths, views_, data_cfg, train, rank=rank(), world_size=world_size(),
                            pin_memory=device.type == "cuda")
    if teacher is not None:
        dataset.share_views(views, cache)  # replay the cache's recorded views, or share online views
    distiller = Distiller(student, build_losses(losses), dataset, train, run_dir,
                          teacher=cache if cache is not None else teacher_fn,
                          evaluator=evaluator, config=config, teacher_fingerprint=teacher_fp, resume=resume,
                          collate_fn=collate_skipping)
    from xmodal.distributed import is_main_process
    from xmodal.students.export import write_student_config

    if is_main_process():  # before training, so an interrupted run can be exported too
        write_student_config(run_dir, clip_model.model_cfg, clip_model.preprocess_cfg)
    return distiller.fit()


def obtain_teacher(cfg: TeacherConfig, paths: DataPaths, data_cfg: DataConfig, run_dir: Path,
                   device: torch.device) -> ClipModel:
    """Load the teacher; with `teacher.train`, train it first, or reuse the one trained with the same settings."""
    if cfg.train is None:
        with torch.random.fork_rng(devices=[]):  # random weights (model_cfg alone) are the same in every process
            torch.manual_seed(0)
            teacher = load_clip(cfg, device)
        if cfg.model_cfg is not None:
            log.warning("teacher: built from model_cfg with random weights and no teacher.train; "
                        "it will teach noise. Give pretrained weights or a teacher.train block")
        return teacher
    # where (and which views) outputs are cached is not the teacher
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("cache", "cache_views")}
    data = train_data_identity(paths)
    key = hash_json({"teacher": settings, "data": data.digest})  # the data's content, not its name or size
    folder = run_dir / "teacher" / key  # one folder per settings: a changed teacher never meets old checkpoints
    export_dir = folder / "open_clip"
    from xmodal.tasks.clip.config import ClipModelConfig

    exported = ClipModelConfig(model=str(export_dir))
    if (export_dir / "open_clip_config.json").is_file():
        log.info("teacher: reusing the teacher trained earlier in %s", export_dir)
        return load_clip(exported, device)
    from xmodal.distributed import world_size
    from xmodal.students.export import export_open_clip

    with contextlib.ExitStack() as stack:
        if world_size() == 1:  # runs started side by side share one teacher: the first trains it, the rest wait
            stack.enter_context(wait_for_run_folder(folder, "the teacher"))
            if (export_dir / "open_clip_config.json").is_file():
                log.info("teacher: reusing the teacher another process just trained in %s", export_dir)
                return load_clip(exported, device)
        seed_everything(cfg.train.seed)  # the teacher's initial weights follow its own recipe, whoever trains it
        teacher = load_clip(cfg, device)
        log.info("teacher: training %s params contrastively for %d steps", f"{count_parameters(teacher.model):,}",
                 cfg.train.steps)
        train_clip(teacher, paths, data_cfg, cfg.train, folder, losses=[LossSpec("clip")], device=device,
                   config={"teacher": settings}, resume=RESUME_AUTO)  # an interrupted teacher run continues
        export_open_clip(teacher.model, teacher.model_cfg, export_dir, teacher.preprocess_cfg, overwrite=True)
    return load_clip(exported, device)  # the exported form, so a fresh and a reused teacher are the same teacher


@contextlib.contextmanager
def wait_for_run_folder(folder: Path, what: str, poll: float = 2.0, report_every: float = 60.0) -> Iterator[None]:
    """Hold run folder `folder`'s lock for the block, waiting (with a log line now and then) while another
    process holds it, instead of refusing: that process is training what this one needs."""
    from xmodal.engine.run import run_folder_lock
    from xmodal.lock import LockedError

    with contextlib.ExitStack() as stack:
        start = last = None
        while True:
            try:
                stack.enter_context(run_folder_lock(folder))
                break
            except LockedError as e:
                now = time.monotonic()
                if last is None or now - last >= report_every:
                    start = start if start is not None else now
                    log.info("%s is being trained by %s in %s; waiting for it (%.0f s so far)", what,
                             f"process {e.holder}" if e.holder else "another process", folder, now - start)
                    last = now
                time.sleep(poll)
        yield


def build_student(teacher: ClipModel, model_cfg: dict, inherit, device: torch.device,
                  source: ClipModel | None = None,
                  batches: Callable[[ClipModel], Iterator[dict]] | None = None) -> tuple[ClipModel, dict | None]:
    """A student from `model_cfg`, inheriting weights from `source` (the teacher or the previous stage).

    `inherit.mode: auto` learns masks on the source from `batches(source)` (training batches in its own pipeline)
    and fuses them into the student; `manual` slices the source's weights by rule; no `inherit`: random init.
    """
    from xmodal.students.clip import create_student
    from xmodal.students.inheritance import inherit_weights

    preprocess = {k: v for k, v in teacher.preprocess_cfg.items() if k != "size"}
    source = source or teacher
    if inherit is not None and inherit.mode == "auto":
        if batches is None:
            raise ConfigError("student.inherit.mode 'auto' learns masks on training data, and none was given here; "
                              "use mode: manual")
        model, report = auto_inherit(source, model_cfg, preprocess, inherit.auto, batches(source), device)
        return wrap_open_clip(model, model_cfg), report
    model = create_student(model_cfg, preprocess, device=device)
    report = None
    if inherit is not None:
        report = inherit_weights(source.model, model, layers=inherit.layers, channels=inherit.channels)
    return wrap_open_clip(model, model_cfg), report


def auto_inherit(source: ClipModel, model_cfg: dict, preprocess_cfg: dict, cfg: AutoInheritConfig,
                 batches: Iterator[dict], device: torch.device) -> tuple[nn.Module, dict]:
    """Automatic inheritance (TinyCLIP): masks on a copy of `source` learn affinity mimicking under the student's
    sparsity, then the top-scoring layers, heads and channels are fused into the `model_cfg` student."""
    from xmodal.losses import LOSSES
    from xmodal.students.auto_inheritance import MaskedCLIP, learn_masks

    masked = MaskedCLIP(source.model, train_weights=cfg.train_weights).to(device)
    affinity = LOSSES.build("affinity")
    target = masked.target_density(model_cfg)
    log.info("automatic inheritance: learning masks for %d steps toward density %.3f", cfg.steps, target)
    history = learn_masks(masked, source.model, batches, lambda s, t, b: affinity(s, t, b).loss, model_cfg,
                          steps=cfg.steps, lr=cfg.lr, lambda_lr=cfg.lambda_lr, warmup_steps=cfg.warmup_steps)
    if len(history) < cfg.steps:
        raise DataError(f"automatic inheritance: the training data ran out after {len(history)} of {cfg.steps} steps")
    model, report = masked.fuse(model_cfg, preprocess_cfg)
    report["target_density"] = target
    log.info("automatic inheritance: mask density %.3f (target %.3f), fused into the student",
             report["density"], target)
    return model.requires_grad_(True), report


def training_batches(model: ClipModel, paths: DataPaths, data_cfg: DataConfig, batch_size: int, seed: int,
                     device: torch.device) -> Iterator[dict]:
    """Endless training batches in `model`'s own pipeline, on `device`; the same batches in every process."""
    from xmodal.engine import BatchStream, to_device

    train = TrainConfig(batch_size=batch_size, seed=seed)  # one process's stream: every process reads all data
    dataset = training_data(paths, [View(model.train_transform, model.tokenizer)], data_cfg, train)
    for batch in BatchStream(dataset, global_batch=batch_size, seed=seed, collate_fn=collate_skipping):
        yield to_device(batch, device)


def load_stage_student(teacher: ClipModel, model_cfg: dict, path: Path, device: torch.device) -> ClipModel:
    """A finished stage's student, read from its final checkpoint (the `clip.*` part of the engine's state)."""
    from xmodal.engine.checkpoint import load_checkpoint
    from xmodal.students.clip import create_student

    state = load_checkpoint(path)["model"]
    model = create_student(model_cfg, {k: v for k, v in teacher.preprocess_cfg.items() if k != "size"},
                           device=device)
    try:
        model.load_state_dict({k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")})
    except RuntimeError as e:
        raise CheckpointError(f"{path}: this stage's checkpoint does not fit its planned student: {e}") from e
    return wrap_open_clip(model.requires_grad_(False), model_cfg)


def stage_plan(cfg: ClipDistillConfig, teacher: ClipModel) -> list[tuple[dict, TrainConfig]]:
    """(model_cfg, train config) for each stage; a single stage when `stages` is empty."""
    from xmodal.students.clip import model_cfg_of, progressive_model_cfgs, shrink_model_cfg

    if not cfg.stages:
        s = cfg.student
        if s.model_cfg is not None:
            mcfg = copy.deepcopy(s.model_cfg)
        elif s.model is not None:
            mcfg = model_cfg_of(s.model)
        else:
            mcfg = shrink_model_cfg(teacher.model_cfg, s.shrink)
        return [(mcfg, cfg.train)]
    cfgs = progressive_model_cfgs(teacher.model_cfg, [st.shrink for st in cfg.stages])
    plan = []
    for st, mcfg in zip(cfg.stages, cfgs):
        train = copy.deepcopy(cfg.train)
        if st.steps is not None:
            train.steps = st.steps
        if st.lr is not None:
            train.lr = st.lr
        plan.append((mcfg, train))
    return plan


def stage_records(cfg: ClipDistillConfig, teacher: ClipModel, plan: list[tuple[dict, TrainConfig]]) -> list[Stage]:
    """The engine's view of the plan: each stage's folder and identity (what decides the student it trains)."""
    from xmodal.fingerprint import model_fingerprint

    shared = {"teacher": model_fingerprint(teacher.model, teacher.preprocess_cfg), "losses": to_dict(cfg.losses),
              "inherit": to_dict(cfg.student.inherit), "projection": cfg.student.projection}
    last = len(plan) - 1
    return [Stage(f"stage{k}", "" if k == last else f"stages/{k}",
                  {"model_cfg": model_cfg, "train": train_identity(train), **shared}, train.steps)
            for k, (model_cfg, train) in enumerate(plan)]


@register_job("clip_distill", ClipDistillConfig, help="compress a CLIP teacher into a smaller student")
def run(cfg: ClipDistillConfig) -> dict:
    """Train (or reuse) the teacher, then each stage in turn; a resumed run skips the stages it finished."""
    from xmodal.distributed import is_main_process
    from xmodal.engine.checkpoint import CheckpointManager
    from xmodal.students.clip import describe_model_cfg

    check_losses(cfg.losses)  # a loss needing what CLIP models lack fails now, not after teacher training
    device = init_distributed(cfg.train.device)  # this process's device (cuda:LOCAL_RANK under torchrun)
    seed_everything(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    StageRun.check_resumable(run_dir, cfg.resume)  # before the teacher, which may take long to train
    paths = resolve_data(cfg.data)
    teacher = obtain_teacher(cfg.teacher, paths, cfg.data, run_dir, device)
    teacher.model.eval().requires_grad_(False)
    plan = stage_plan(cfg, teacher)
    stages = StageRun(run_dir, stage_records(cfg, teacher, plan), resume=cfg.resume)
    results: dict[str, Any] = {"teacher": {"params": count_parameters(teacher.model),
                                           "arch": describe_model_cfg(teacher.model_cfg)}}
    if stages.finished:
        log.info("all %d stage(s) in %s finished earlier: nothing to train (raise train.steps to train on)",
                 len(plan), run_dir)
    inherit = cfg.student.inherit
    batch_size = inherit.auto.batch_size if inherit is not None and inherit.auto.batch_size else cfg.train.batch_size
    previous: ClipModel | None = None
    finished_before: int | None = None  # the finished stage the next one inherits from, loaded when needed
    for k, (model_cfg, train) in enumerate(plan):
        record = stages[k]
        if record.status == DONE:
            log.info("stage %d/%d: finished earlier (%s), skipped", k + 1, len(plan), record.checkpoint)
            results[record.name] = record.result
            finished_before = k
            continue
        stage_dir = stages.folder(k)
        resume = stages.resume(k)
        restoring = resume is not None and CheckpointManager(stage_dir / "checkpoints").resolve(resume) is not None
        if restoring:
            stage_inherit = None  # the checkpoint holds the student: inheriting again would be wasted work
        else:
            stage_inherit = inherit
            if previous is None and finished_before is not None and inherit is not None:
                previous = load_stage_student(teacher, plan[finished_before][0], stages.checkpoint(finished_before),
                                              device)
        seed_everything(train.seed)  # a stage's start depends on its inputs, not on how earlier stages used the RNG
        student, report = build_student(
            teacher, model_cfg, stage_inherit, device, previous,
            batches=lambda src, seed=train.seed: training_batches(src, paths, cfg.data, batch_size, seed, device))
        how = "random init" if report is None else f"{report.get('mode', 'manual')} inheritance"
        how = "restored from its checkpoint" if restoring else how
        log.info("stage %d/%d: student %s, %s params (%s)", k + 1, len(plan), describe_model_cfg(model_cfg),
                 f"{count_parameters(student.model):,}", how)
        evaluator = make_evaluator(student, paths, cfg.eval.split, cfg.eval.batch_size, cfg.eval.zeroshot, device)
        stages.start(k)
        out = train_clip(student, paths, cfg.data, train, stage_dir, losses=cfg.losses, teacher=teacher,
                         evaluator=evaluator, config=cfg, resume=resume, projection=cfg.student.projection,
                         device=device, teacher_cache=cfg.teacher.cache, views=view_recipe(cfg))
        results[record.name] = {
            "arch": describe_model_cfg(model_cfg), "params": count_parameters(student.model),
            "inherit": "none" if inherit is None else inherit.mode,
            **{key: v for key, v in out.items() if isinstance(v, (int, float, str))},
        }
        if report is not None and "density" in report:
            results[record.name]["mask_density"] = report["density"]
        stages.finish(k, out["step"], results[record.name])
        student.model.requires_grad_(False)
        previous = student
    if is_main_process():
        atomic_write_json(run_dir / "results.json", results)
    return results


@register_cache_source("clip_distill")
def cache_source(cfg: ClipDistillConfig) -> CacheSource:
    """`xmodal cache CONFIG`: the teacher's image and caption embeddings for every training sample."""
    device = init_distributed(cfg.train.device)
    paths = resolve_data(cfg.data)
    teacher = obtain_teacher(cfg.teacher, paths, cfg.data, Path(cfg.run_dir), device)
    fn = ClipTeacher(teacher.model, extra=teacher.preprocess_cfg)
    view = View(teacher.eval_transform, teacher.tokenizer, render=ViewRenderer(teacher.preprocess_cfg))
    if paths.shards is not None:  # the shards' samples by index: the stream's keys and captions
        d = cfg.data
        dataset = PairedViews(ShardRecords(paths.shards, caption_sampling=d.caption_sampling,
                                           image_keys=d.shard_image_keys, caption_key=d.shard_caption_key,
                                           on_error=d.on_error), [view])
    else:
        dataset = paired_dataset(paths.train, [view], cfg.data)
    recipe = view_recipe(cfg)
    if recipe is not None:  # K augmented views per image, each stored with its crop and flip
        dataset = RecordedViews(dataset.base, view, recipe)
    data = train_data_identity(paths)
    return CacheSource(fn, dataset, fingerprint(fn.fingerprint, data=data), collate_fn=collate_skipping,
                       batch_size=cfg.train.batch_size, out_dir=cfg.teacher.cache,
                       meta={"data": cfg.data.shards if paths.shards is not None else str(paths.train)},
                       data=data, views=None if recipe is None else recipe.to_dict())


def view_recipe(cfg: ClipDistillConfig) -> ViewRecipe | None:
    """The augmented-view recipe of `teacher.cache_views`, or None."""
    v = cfg.teacher.cache_views
    return None if v is None else ViewRecipe(v.count, tuple(v.scale), tuple(v.ratio), v.flip, v.seed)

"""Typed config of the `clip_distill` job (YAML → these dataclasses; see examples/clip_*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from xmodal.config import LossSpec, TrainConfig
from xmodal.errors import ConfigError


@dataclass
class ClipModelConfig:
    """An open_clip model: a name (+ pretrained tag or file), an `hf-hub:`/`local-dir:` id or folder, or a model_cfg."""

    model: str | None = None
    pretrained: str | None = None
    model_cfg: dict[str, Any] | None = None

    def check(self, where: str) -> None:
        if (self.model is None) == (self.model_cfg is None):
            raise ConfigError(
                f"{where}: give exactly one of 'model' (open_clip name or folder) or 'model_cfg' (explicit config)"
            )


@dataclass
class CacheViewsConfig:
    """Augmented views the teacher sees (MobileCLIP-style reinforced data): `count` views per image, each a random
    resized crop (area `scale`, aspect `ratio`, as open_clip's train transform) then a horizontal flip with
    probability `flip`, drawn from `seed`. `xmodal cache` stores the teacher's embeddings of every view with its
    parameters; training replays one stored view per (seed, key, epoch), re-rendered for the student. Without
    `teacher.cache`, a fresh view per epoch is drawn online and shared by teacher and student."""

    count: int = 4
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    seed: int = 0


@dataclass
class TeacherConfig(ClipModelConfig):
    """The teacher; with `train`, it is first trained contrastively (needed when no pretrained weights exist)."""

    train: TrainConfig | None = None
    cache: str | None = None  # a teacher-cache folder written by `xmodal cache`
    cache_views: CacheViewsConfig | None = None  # augmented views stored in (and replayed from) the cache


@dataclass
class AutoInheritConfig:
    """Automatic inheritance: hard-concrete masks on the source learn, under the student's sparsity, to keep
    the layers, heads and MLP channels that matter for affinity mimicking; then they are fused into the student."""

    steps: int = 200
    lr: float = 0.05
    lambda_lr: float = 0.05  # the Lagrange multipliers' rate (they rise until the density meets the target)
    warmup_steps: int = 0  # the target density falls from 1 to the student's over these steps
    batch_size: int | None = None  # None: train.batch_size
    train_weights: bool = False  # learn the source's weights with the masks (TinyCLIP) or the masks alone

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"student.inherit.auto.steps must be at least 1 (mask-learning steps), got {self.steps}")


@dataclass
class InheritConfig:
    """Weight inheritance (TinyCLIP): `manual` slices by rule (which layers, which channels); `auto` learns masks."""

    mode: Literal["manual", "auto"] = "manual"
    layers: Literal["uniform", "first"] = "uniform"
    channels: Literal["first", "importance"] = "importance"
    auto: AutoInheritConfig = field(default_factory=AutoInheritConfig)


@dataclass
class StudentConfig:
    """The student: an explicit open_clip model (`model`/`model_cfg`) or the teacher config shrunk by `shrink`."""

    model: str | None = None
    model_cfg: dict[str, Any] | None = None
    shrink: dict[str, Any] | None = None
    inherit: InheritConfig | None = field(default_factory=InheritConfig)
    projection: Literal["identity", "linear", "mlp"] | None = None  # into the teacher's space; None = auto


@dataclass
class StageConfig:
    """One progressive-compression stage: shrink relative to the teacher; inherits from the previous stage."""

    shrink: dict[str, Any]
    steps: int | None = None
    lr: float | None = None


@dataclass
class SyntheticDataConfig:
    """Generate the synthetic image-caption world into `data.root` when it is not there yet."""

    train: int = 5000
    val: int = 500
    test: int = 1000
    seed: int = 0
    image_size: int = 64
    captions_per_image: int = 3


@dataclass
class DataConfig:
    """Image-text CSV/TSV/JSON-lines files; relative names are taken inside `root` when it is set.

    `shards` trains from webdataset tar shards instead of `train` (a brace pattern such as
    "shards/shard-{000000..000127}.tar", as `xmodal data shards` prints it; see xmodal/data/shards.py): the image is
    the first member among `shard_image_keys`, the captions are read from `shard_caption_key` ("txt", another
    member, or "json.FIELD"; None: the json's "captions", else "txt"), and `shard_shuffle` samples fill the
    shuffle buffer (0 or 1: shard order only). Validation and test stay CSV/JSON lines.
    """

    train: str = "train.csv"
    val: str | None = "val.csv"
    test: str | None = "test.csv"
    zeroshot: str | None = "zeroshot.json"
    root: str | None = None
    synthetic: SyntheticDataConfig | None = None
    on_error: Literal["skip", "raise"] = "skip"
    caption_sampling: Literal["first", "random", "all"] = "random"
    shards: str | None = None
    shard_image_keys: list[str] = field(default_factory=lambda: ["jpg", "png", "webp"])
    shard_caption_key: str | None = None
    shard_shuffle: int = 1000

    def __post_init__(self) -> None:
        if self.shards is not None and not self.shard_image_keys:
            raise ConfigError("data.shard_image_keys: name at least one image member (e.g. [jpg, png, webp])")
        if self.shard_shuffle < 0:
            raise ConfigError(f"data.shard_shuffle must be 0 or more samples, got {self.shard_shuffle}")


@dataclass
class EvalConfig:
    """Evaluation during and after training: retrieval on `split`, zero-shot when the data has a task."""

    split: Literal["val", "test"] = "val"
    batch_size: int = 256
    zeroshot: bool = True


@dataclass
class ClipDistillConfig:
    """Compress a CLIP teacher into a student: optional teacher training, stages, losses, evaluation."""

    run_dir: str
    teacher: TeacherConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: list[LossSpec] = field(default_factory=lambda: [LossSpec("affinity")])
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: str | None = None

    def __post_init__(self) -> None:
        self.teacher.check("teacher")
        if self.teacher.cache and self.data.caption_sampling == "random":
            raise ConfigError(
                "teacher.cache: cached teacher outputs are stored per sample id, so each id must always show the "
                "same caption; set data.caption_sampling to 'all' (every caption, one sample each) or 'first'"
            )
        s = self.student
        given = sum(x is not None for x in (s.model, s.model_cfg, s.shrink))
        if self.stages and given:
            raise ConfigError("student: with 'stages', each stage's 'shrink' describes the student; drop student.*")
        if not self.stages and given != 1:
            raise ConfigError("student: give exactly one of 'model', 'model_cfg' or 'shrink' (or use 'stages')")

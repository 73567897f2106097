"""Typed config of the `bev_distill` job (YAML → these dataclasses; see examples/bev_lidar_to_camera.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from xmodal.config import LossSpec, TrainConfig
from xmodal.data.bev import CAMERA, BEVGrid
from xmodal.errors import ConfigError
from xmodal.nn.bev import BEVDetectorConfig, DecodeConfig
from xmodal.registry import suggest


@dataclass
class SyntheticBEVConfig:
    """Write synthetic-bev scenes into `data.root`/{train,val,test} when they are not there yet (split k uses seed
    `seed + k`, so the splits are different scenes)."""

    train: int = 200
    val: int = 50
    test: int = 50
    seed: int = 0
    objects: tuple[int, int] = (3, 9)
    image_size: tuple[int, int] = (96, 160)
    lidar_beams: int = 32
    lidar_azimuths: int = 720


@dataclass
class BEVDataConfig:
    """synthetic-bev style folders; relative names are taken inside `root` when it is set. Every map lies on
    `grid`; boxes whose centre lies off it are not targets and not scored."""

    root: str | None = None
    train: str = "train"
    val: str | None = "val"
    test: str | None = "test"
    synthetic: SyntheticBEVConfig | None = None
    grid: BEVGrid = field(default_factory=BEVGrid)
    camera: str = CAMERA


def _detection_losses() -> list[LossSpec]:
    return [LossSpec("centerpoint", 1.0)]


def _unidistill(feature: float, relation: float, response: float) -> list[LossSpec]:
    return _detection_losses() + [LossSpec("unidistill_feature", feature), LossSpec("unidistill_relation", relation),
                                  _response(response)]


def _response(weight: float, **params: float) -> LossSpec:
    # UniDistill's code compares the student's heatmap with the teacher's logits halved before the sigmoid
    return LossSpec("unidistill_response", weight, {"temperature": 2.0, **params})


# Loss sets by distillation direction. camera_from_lidar is UniDistill's camera←LiDAR objective (detection +
# 100·feature + 40·relation + 10·response, teacher heatmap softened by 2); the other directions start from the same
# weights. camera_from_lidar_response keeps only the response term, over a wider Gaussian around each box (σ = 1.5 ×
# half the box diagonal, at least 1.5 m): on the synthetic scenes at a CPU budget the feature and relation terms lower
# the camera student's mAP and this one does not (benchmarks/bench_bev_distill.py, BENCHMARKS.md).
LOSS_PRESETS = {
    "camera_from_lidar": lambda: _unidistill(100.0, 40.0, 10.0),
    "camera_from_lidar_response": lambda: _detection_losses() + [_response(10.0, sigma_scale=1.5, min_sigma=1.5)],
    "lidar_from_camera": lambda: _unidistill(100.0, 40.0, 10.0),
    "detection_only": _detection_losses,
}


@dataclass
class BEVTeacherConfig:
    """The teacher: a trained detector file (`path`), or a detector `model` trained here first on the training
    scenes (with `train` and `losses`; reused from `run_dir/teacher/<settings hash>` while nothing changed)."""

    path: str | None = None
    model: BEVDetectorConfig | None = None
    train: TrainConfig | None = None
    losses: list[LossSpec] = field(default_factory=_detection_losses)
    cache: str | None = None  # a teacher-cache folder written by `xmodal cache CONFIG`

    def __post_init__(self) -> None:
        if (self.path is None) == (self.model is None):
            raise ConfigError("teacher: give exactly one of 'path' (a trained BEV detector file) or 'model' "
                              "(a detector config to train on the training scenes first)")
        if self.model is not None and self.train is None:
            raise ConfigError("teacher: 'model' needs a 'train' block (steps, batch_size, lr, ...) to train it")


@dataclass
class BEVEvalConfig:
    batch_size: int = 8
    max_batches: int | None = None
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class BEVDistillConfig:
    """Train a BEV detector (typically camera) from a frozen BEV teacher (typically LiDAR) with UniDistill.

    `losses` (when given) replace the `preset` loss set; without a teacher only detection losses make sense.
    `projection`: "linear" gives the student a 1×1 convolution per distilled map into the teacher's width
    (trained with it, skipped by detection), "identity" none (widths must then match).
    """

    run_dir: str
    data: BEVDataConfig = field(default_factory=BEVDataConfig)
    teacher: BEVTeacherConfig | None = None
    student: BEVDetectorConfig = field(default_factory=lambda: BEVDetectorConfig(sensor="camera"))
    preset: str = "camera_from_lidar"
    losses: list[LossSpec] | None = None
    projection: str = "linear"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: BEVEvalConfig = field(default_factory=BEVEvalConfig)
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in LOSS_PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}'{suggest(self.preset, list(LOSS_PRESETS))}; "
                              f"choose from {', '.join(LOSS_PRESETS)} or give 'losses'")
        if self.projection not in ("linear", "identity"):
            raise ConfigError(f"projection must be 'linear' or 'identity', got '{self.projection}'")

    def loss_specs(self) -> list[LossSpec]:
        return list(self.losses) if self.losses is not None else LOSS_PRESETS[self.preset]()

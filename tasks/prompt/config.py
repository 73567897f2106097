"""Typed config of the `prompt_distill` job (YAML → these dataclasses; see examples/prompt_distill*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from xmodal.config import LossSpec, TrainConfig
from xmodal.errors import ConfigError
from xmodal.tasks.clip.config import TeacherConfig


@dataclass
class PromptsConfig:
    """Deep visual prompts: `n` tokens after the patch tokens, replaced before each of the first `depth` blocks
    (null: every block of the encoder)."""

    n: int = 4
    depth: int | None = None
    init_std: float = 0.02


@dataclass
class PromptStudentConfig:
    """The frozen student CLIP (exactly one of `model` (+ `pretrained`), `model_cfg` or `run`), its prompts and
    the projector into the teacher's width. With `train`, the CLIP is first trained contrastively on the data's
    captions (the synthetic world, where no pretrained weights exist), and reused while its settings are unchanged.
    """

    model: str | None = None  # open_clip name, hf-hub:/local-dir: id, or a folder (e.g. an `xmodal export` output)
    pretrained: str | None = None  # pretrained tag or a local weights file
    model_cfg: dict[str, Any] | None = None
    run: str | None = None  # a clip_distill run folder (or one of its checkpoints): its trained student
    train: TrainConfig | None = None
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    projector: Literal["mlp", "linear"] = "mlp"
    prompts_file: str | None = None  # start from prompts (+ projector) saved by an earlier run

    def __post_init__(self) -> None:
        given = [k for k in ("model", "model_cfg", "run") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("student: give exactly one of 'model' (open_clip name or folder), 'model_cfg' or "
                              f"'run' (a clip_distill run folder); got {', '.join(given) or 'none'}")
        if self.train is not None and self.model_cfg is None:
            raise ConfigError("student.train trains a CLIP built from student.model_cfg; drop it for pretrained "
                              "students")


@dataclass
class ClassesConfig:
    """The class list and prompt templates of the teacher's class vectors.

    `file`: a JSON file with `classnames` and `templates` (a zeroshot.json; default: data.test); `names` and
    `templates` given here replace the file's. `train`: the classes whose distribution is distilled: `all`
    (PromptKD's unlabelled setting) or `base` (the first ⌈C/2⌉ classes by name; labelled training images of the
    other classes are then left out).
    """

    file: str | None = None
    names: list[str] | None = None
    templates: list[str] | None = None
    train: Literal["all", "base"] = "all"


@dataclass
class PromptSyntheticConfig:
    """Generate the synthetic image world into `data.root` when it is not there (images, captions, zeroshot.json)."""

    train: int = 2000
    val: int = 500
    test: int = 100
    seed: int = 0
    image_size: int = 64
    zeroshot_per_class: int = 10
    captions_per_image: int = 3


@dataclass
class PromptDataConfig:
    """Images: `train` is a folder of images (no labels needed) or a task JSON (zeroshot.json format); `val` and
    `test` are labelled task JSONs. Without `val`, `val_fraction` of the training images (chosen by their key) are
    held out to choose the checkpoint. Relative paths are taken inside `root`. `captions` is the image-caption
    file a `teacher.train` / `student.train` block trains on. In the synthetic world, `train` and `val` default to
    the single-object images of its train and val splits (set `train: images/train` for every training image)."""

    root: str | None = None
    synthetic: PromptSyntheticConfig | None = None
    train: str | None = None
    val: str | None = None
    val_fraction: float = 0.1
    test: str | None = "zeroshot.json"
    captions: str | None = "train.csv"
    augment: bool = True  # the student sees the train transform (random crops); the teacher always the eval one
    on_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class PromptEvalConfig:
    """Checkpoint choice on the validation split (`auto`: HM with labels, agreement with the teacher without;
    `last`: the final step) and the test report (`baselines`: teacher and student zero-shot too)."""

    batch_size: int = 256
    select: Literal["auto", "hm", "top1", "agreement", "last"] = "auto"
    baselines: bool = True


@dataclass
class PromptDistillConfig:
    """Distil a CLIP teacher's zero-shot knowledge into prompts (+ projector) of a frozen student CLIP."""

    run_dir: str
    teacher: TeacherConfig
    student: PromptStudentConfig
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    class_vectors: str | None = None  # a file to keep W_T in (default: run_dir/class_vectors/<identity>.safetensors)
    pretrain_dir: str | None = None  # where teacher.train / student.train models live (default: run_dir/pretrained)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    losses: list[LossSpec] = field(default_factory=lambda: [LossSpec("prompt_kd")])
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500, batch_size=32, lr=2e-3,
                                                                   weight_decay=0.0, warmup_steps=20))
    eval: PromptEvalConfig = field(default_factory=PromptEvalConfig)
    resume: str | None = None

    def __post_init__(self) -> None:
        self.teacher.check("teacher")

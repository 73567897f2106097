"""Typed config of the `lipread_distill` job (YAML → these dataclasses; see examples/lipread_from_speech.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmodal.config import LossSpec, TrainConfig
from xmodal.data.av import AudioConfig, VideoConfig
from xmodal.errors import ConfigError
from xmodal.students.lipreader import LipReaderConfig
from xmodal.teachers.speech import SpeechRecognizerConfig


@dataclass
class SyntheticGridConfig:
    """Generate the synthetic GRID-like corpus into `data.root` when it is not there yet."""

    speakers: int = 6
    utterances: int = 20  # per speaker
    seed: int = 0
    roi_size: int = 64
    fps: float = 25.0
    sample_rate: int = 16000


@dataclass
class LipreadDataConfig:
    """JSON-lines audio-visual manifests; relative names are taken inside `root` when it is set."""

    root: str | None = None
    train: str = "train.jsonl"
    val: str | None = "val.jsonl"
    test: str | None = "test.jsonl"
    synthetic: SyntheticGridConfig | None = None
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    # characters after <blank> and <sos/eos>, or a sentencepiece `.model` file (`xmodal data vocab`; a relative
    # path is taken inside `root`); student.vocab_size (and a trained teacher's) is its size
    vocab: str = " '" + "abcdefghijklmnopqrstuvwxyz"


def _default_teacher_losses() -> list[LossSpec]:
    return [LossSpec("ctc", 0.3, {"modality": "audio"}), LossSpec("attention_ce", 0.7, {"key": "audio_context"})]


@dataclass
class SpeechTeacherConfig:
    """The speech teacher: a trained recogniser file (`path`), or a `model` trained here on the training audio
    first (with `train` and `losses`; reused from `run_dir/teacher` while its config is unchanged).

    `kind` says what `path` holds: "speech" (an xmodal recogniser file) or "wav2vec2" (a torchaudio
    wav2vec2/HuBERT file written by `save_wav2vec2`, or an architecture name with `params.checkpoint` a local
    state dict; `params` also takes `labels` and `normalize_waveform`). A wav2vec2 teacher reads waveforms.
    """

    path: str | None = None
    kind: str = "speech"
    params: dict[str, Any] = field(default_factory=dict)
    model: SpeechRecognizerConfig | None = None
    train: TrainConfig | None = None
    losses: list[LossSpec] = field(default_factory=_default_teacher_losses)
    cache: str | None = None  # a teacher-cache folder written by `xmodal cache CONFIG`: no audio, no teacher forward

    def __post_init__(self) -> None:
        if (self.path is None) == (self.model is None):
            raise ConfigError("teacher: give exactly one of 'path' (a trained recogniser file) or 'model' "
                              "(a recogniser config to train on the training audio first)")
        if self.model is not None and self.kind != "speech":
            raise ConfigError(f"teacher: kind '{self.kind}' is loaded from 'path', not trained here; drop 'model' "
                              "or use kind: speech")
        if self.model is not None and self.train is None:
            raise ConfigError("teacher: 'model' needs a 'train' block (steps, batch_size, lr, ...) to train it")


@dataclass
class LipreadEvalConfig:
    """Decoding for validation during training and for the final test scores."""

    decoder: str = "greedy"  # greedy | beam | joint
    beam_size: int = 10
    ctc_weight: float = 0.3  # joint decoding: weight of the CTC prefix score
    batch_size: int = 8
    max_batches: int | None = None


def _default_losses() -> list[LossSpec]:
    return [
        LossSpec("ctc", 0.3),
        LossSpec("attention_ce", 0.7),
        LossSpec("libs", 1.0, {"aligner": "attention"}),
    ]


@dataclass
class LipreadDistillConfig:
    """Train a lip reader on video from a frozen speech teacher (LIBS / CTC distillation) and/or transcripts."""

    run_dir: str
    data: LipreadDataConfig = field(default_factory=LipreadDataConfig)
    teacher: SpeechTeacherConfig | None = None  # None: supervised baseline, no distillation
    student: LipReaderConfig = field(default_factory=LipReaderConfig)
    projection: str = "linear"  # student states → teacher width (identity when equal and chosen)
    losses: list[LossSpec] = field(default_factory=_default_losses)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: LipreadEvalConfig = field(default_factory=LipreadEvalConfig)
    resume: str | None = None

"""LIBS multi-granularity distillation from a speech teacher to a lip reader, with teacher filtering.

Keys read from the aligned outputs (all in the alignment space, so widths match):

- frame and sequence level: student `"video"` and teacher `"audio"` Features — tokens are encoder states
  [B, T, D] with padding masks, pooled are the masked-mean summaries, logits are CTC logits (the teacher's
  are used for filtering).
- context level: student `"video_context"` and teacher `"audio_context"` Features — tokens are the attention
  decoder's states for each output step (the Transformer analogue of LIBS's context vectors), mask marks real
  steps. `VideoContextAdapter` / `AudioContextAdapter` in `xmodal.adapters.speech` produce them. Both decoders
  are teacher-forced on the same transcript, so step j of one is step j of the other: the context level aligns
  them with `identity` by default (`attention` only when the two decoders see different label sequences).

Formulas (design.md): frame `mean_j ‖ã_j − P(h^v_j)‖²` over real video frames with ã from an aligner
(LIBS attention by default); sequence `‖P(s^v) − s^a‖²`; context: the frame formula on decoder states
(identity alignment by default).
‖·‖² is the squared L2 norm over the feature dimension (`distance: squared`, the paper's). Two alternatives,
chosen by `distance`: `mean_squared` divides by the width D (the same direction, a weight that does not grow with
D), and `cosine` uses 1 − cos(a, b) = ½‖a/‖a‖ − b/‖b‖‖², scale-invariant, so the term stays in [0, 2] whatever
the norm of the teacher's states and cannot be lowered by shrinking or inflating the student's. Teacher values
are detached: gradients reach the student only. Per-sample values are averaged with `batch["sample_weight"]`
when present, times the filter's weights when the loss's own `filter` is set.

Teacher filtering (`TeacherFilter`): the teacher's CER on each labelled sample (greedy CTC transcript from
its logits against `batch["targets"]`, or `batch["teacher_cer"]` when given) either drops the sample from
the distillation terms (hard: CER > max_cer) or weights it by exp(−rate·CER) (soft). Samples without a
transcript cannot be judged and keep weight 1. The acceptance rate (the fraction of labelled samples kept,
or their mean weight for soft filtering) is logged as the part `accept_rate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses.base import DistillLoss, LossOutput, Outputs, register_loss, sample_weighted_mean
from xmodal.seqalign import ALIGNERS, IGNORE_ID, ctc_greedy, target_lengths

FilterMode = Literal["none", "hard", "soft"]
Distance = Literal["squared", "mean_squared", "cosine"]


def _squared(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).sum(-1)


def _mean_squared(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).mean(-1)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-6)


DISTANCES = {"squared": _squared, "mean_squared": _mean_squared, "cosine": _cosine}


def check_distance(kind: str) -> str:
    if kind not in DISTANCES:
        raise ConfigError(f"LIBS distance must be one of {', '.join(map(repr, DISTANCES))}, got '{kind}'")
    return kind


def feature_distance(a: Tensor, b: Tensor, kind: Distance = "squared") -> Tensor:
    """Distance between feature vectors along the last dimension: ‖a−b‖², ‖a−b‖²/D or 1 − cos(a, b)."""
    return DISTANCES[check_distance(kind)](a, b)


# ---------------------------------------------------------------- teacher filtering


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two label sequences."""
    import torchaudio.functional as AF

    return int(AF.edit_distance(a, b))


@dataclass
class FilterResult:
    """Per-sample weights [B], the teacher's CER [B] (NaN without a transcript) and the acceptance rate."""

    weight: Tensor
    cer: Tensor
    accept_rate: Tensor


class TeacherFilter:
    """Hard (drop when teacher CER > max_cer) or soft (weight exp(−rate·CER)) filtering of teacher targets."""

    def __init__(self, mode: FilterMode = "hard", max_cer: float = 0.3, rate: float = 2.0, blank: int = 0):
        if mode not in ("none", "hard", "soft"):
            raise ConfigError(f"teacher filter mode must be 'none', 'hard' or 'soft', got '{mode}'")
        if max_cer < 0 or rate < 0:
            raise ConfigError(f"teacher filter needs max_cer >= 0 and rate >= 0, got {max_cer} and {rate}")
        self.mode, self.max_cer, self.rate, self.blank = mode, float(max_cer), float(rate), blank

    def teacher_cer(self, teacher: Features, batch: Mapping[str, Any]) -> Tensor:
        """CER [B] of the teacher's greedy CTC transcript; NaN for samples without a transcript."""
        if batch.get("teacher_cer") is not None:
            return torch.as_tensor(batch["teacher_cer"], dtype=torch.float32, device=teacher.pooled.device)
        if "targets" not in batch:
            raise ConfigError(
                "teacher filtering needs batch['targets'] (reference transcripts) or batch['teacher_cer']"
            )
        if teacher.logits is None or teacher.logits.dim() != 3:
            raise ConfigError("teacher filtering needs the teacher's CTC logits [B, T, V] in its Features.logits")
        targets = batch["targets"]
        lengths = target_lengths(targets, batch.get("target_lengths")).tolist()
        hyps = ctc_greedy(teacher.logits, teacher.mask, self.blank)
        cer = []
        for hyp, ref, n in zip(hyps, targets.tolist(), lengths):
            ref = [t for t in ref[:n] if t != IGNORE_ID]
            cer.append(edit_distance(hyp, ref) / len(ref) if ref else float("nan"))
        return torch.tensor(cer, dtype=torch.float32, device=teacher.pooled.device)

    def weights_from_cer(self, cer: Tensor) -> FilterResult:
        labelled = ~torch.isnan(cer)
        c = torch.nan_to_num(cer, nan=0.0)
        if self.mode == "hard":
            w = (c <= self.max_cer).float()
        elif self.mode == "soft":
            w = torch.exp(-self.rate * c)
        else:
            w = torch.ones_like(c)
        w = torch.where(labelled, w, torch.ones_like(w))
        rate = w[labelled].mean() if bool(labelled.any()) else w.new_tensor(1.0)
        return FilterResult(w, cer, rate)

    def __call__(self, teacher: Features, batch: Mapping[str, Any]) -> FilterResult:
        return self.weights_from_cer(self.teacher_cer(teacher, batch))

    def apply(self, teacher: Features, batch: Mapping[str, Any]) -> tuple[dict[str, Any], FilterResult]:
        """A copy of `batch` whose `sample_weight` is multiplied by the filter weights, plus the result."""
        res = self(teacher, batch)
        old = batch.get("sample_weight")
        w = res.weight if old is None else res.weight * old.to(res.weight)
        return {**batch, "sample_weight": w, "teacher_cer": res.cer}, res


# ---------------------------------------------------------------- losses


class _LibsLoss(DistillLoss):
    """Shared plumbing: optional teacher filtering, then per-sample distances averaged with sample weights."""

    view = "projected"  # compares student states with the teacher's: the student's projection P(·)

    def __init__(
        self,
        student_modality: str = "video",
        teacher_modality: str = "audio",
        filter: FilterMode = "none",
        max_cer: float = 0.3,
        filter_rate: float = 2.0,
        blank: int = 0,
        distance: Distance = "squared",
    ):
        super().__init__()
        self.student_modality = student_modality
        self.teacher_modality = teacher_modality
        self.distance = check_distance(distance)
        self.filter = None if filter == "none" else TeacherFilter(filter, max_cer, filter_rate, blank)

    def filtered(self, teacher: Outputs | None, batch: Mapping | None) -> tuple[Mapping | None, dict[str, Tensor]]:
        if self.filter is None:
            return batch, {}
        ft = self.pick(teacher, self.teacher_modality, "teacher")
        batch, res = self.filter.apply(ft, batch or {})
        return batch, {"accept_rate": res.accept_rate}

    def per_sample(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        raise NotImplementedError

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        batch, parts = self.filtered(teacher, batch)
        return LossOutput(sample_weighted_mean(self.per_sample(student, teacher), batch), parts)


def aligned_frame_distance(fs: Features, ft: Features, aligner, name: str, distance: Distance = "squared") -> Tensor:
    """mean over real student frames of d(ã_j, s_j) with ã the aligned (detached) teacher tokens → [B]."""
    if fs.tokens is None or ft.tokens is None:
        raise ValueError(f"loss '{name}' needs token features from both the student and the teacher")
    ft = ft.detach().float()
    fs = fs.replace(tokens=fs.tokens.float())
    aligned = aligner(ft, fs)
    if aligned.values.shape != fs.tokens.shape:
        raise ValueError(
            f"loss '{name}': aligned teacher tokens {list(aligned.values.shape)} vs student tokens "
            f"{list(fs.tokens.shape)}; project both into the alignment space (same width)"
        )
    d = feature_distance(fs.tokens, aligned.values, distance)
    m = (aligned.mask & fs.mask).to(d.dtype)
    return (d * m).sum(1) / m.sum(1).clamp_min(1.0)


@register_loss("libs_frame")
class LibsFrame(_LibsLoss):
    """Frame level: mean_j ‖ã_j − P(h^v_j)‖², ã from the named aligner (LIBS attention by default)."""

    def __init__(
        self,
        aligner: str = "attention",
        aligner_params: dict | None = None,
        student_modality: str = "video",
        teacher_modality: str = "audio",
        filter: FilterMode = "none",
        max_cer: float = 0.3,
        filter_rate: float = 2.0,
        blank: int = 0,
        distance: Distance = "squared",
    ):
        super().__init__(student_modality, teacher_modality, filter, max_cer, filter_rate, blank, distance)
        self.aligner = ALIGNERS.build(aligner, **(aligner_params or {}))
        self.student_key, self.teacher_key = student_modality, teacher_modality

    def per_sample(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        fs = self.pick(student, self.student_key, "student")
        ft = self.pick(teacher, self.teacher_key, "teacher")
        return aligned_frame_distance(fs, ft, self.aligner, self.name, self.distance)


@register_loss("libs_sequence")
class LibsSequence(_LibsLoss):
    """Sequence level: ‖P(s^v) − s^a‖² (or the chosen `distance`) on the pooled summaries."""

    def per_sample(self, student: Outputs, teacher: Outputs | None) -> Tensor:
        s = self.pick(student, self.student_modality, "student").pooled.float()
        t = self.pick(teacher, self.teacher_modality, "teacher").pooled.detach().float()
        if s.shape != t.shape:
            raise ValueError(
                f"loss '{self.name}': student pooled {list(s.shape)} vs teacher {list(t.shape)}; "
                "project both into the alignment space"
            )
        return feature_distance(s, t, self.distance)


@register_loss("libs_context")
class LibsContext(LibsFrame):
    """Context level: the frame formula on attention-decoder states (`video_context` vs `audio_context`).

    The decoders are teacher-forced on the same transcript, so their steps correspond one to one: `identity`
    alignment. Use `aligner: attention` only when the two decoders read different label sequences."""

    def __init__(
        self,
        student_key: str = "video_context",
        teacher_key: str = "audio_context",
        aligner: str = "identity",
        aligner_params: dict | None = None,
        student_modality: str = "video",
        teacher_modality: str = "audio",
        filter: FilterMode = "none",
        max_cer: float = 0.3,
        filter_rate: float = 2.0,
        blank: int = 0,
        distance: Distance = "squared",
    ):
        super().__init__(aligner, aligner_params, student_modality, teacher_modality, filter, max_cer, filter_rate,
                         blank, distance)
        self.student_key, self.teacher_key = student_key, teacher_key  # decoder states instead of encoder states


def context_params(aligner: str, aligner_params: dict | None, context_aligner: str,
                   context_aligner_params: dict | None) -> dict | None:
    """The context aligner's parameters: its own when given, else the frame aligner's when it is the same kind."""
    if context_aligner_params is not None:
        return context_aligner_params
    return aligner_params if context_aligner == aligner else None


@register_loss("libs")
class Libs(_LibsLoss):
    """LIBS total: frame_weight·frame + sequence_weight·sequence + context_weight·context, filtered once.

    `aligner`/`aligner_params` align the encoder states (frame level); `context_aligner` (identity by default:
    decoder steps over the same transcript correspond one to one) and `context_aligner_params` the decoder
    states. Without `context_aligner_params` the context term takes `aligner_params` when both levels use the
    same aligner, and no parameters otherwise."""

    def __init__(
        self,
        frame_weight: float = 1.0,
        sequence_weight: float = 1.0,
        context_weight: float = 1.0,
        aligner: str = "attention",
        aligner_params: dict | None = None,
        context_aligner: str = "identity",
        context_aligner_params: dict | None = None,
        student_context_key: str = "video_context",
        teacher_context_key: str = "audio_context",
        student_modality: str = "video",
        teacher_modality: str = "audio",
        filter: FilterMode = "none",
        max_cer: float = 0.3,
        filter_rate: float = 2.0,
        blank: int = 0,
        distance: Distance = "squared",
    ):
        super().__init__(student_modality, teacher_modality, filter, max_cer, filter_rate, blank, distance)
        mods = dict(student_modality=self.student_modality, teacher_modality=self.teacher_modality, distance=distance)
        self.weights = {"frame": frame_weight, "sequence": sequence_weight, "context": context_weight}
        self.terms = {
            "frame": LibsFrame(aligner, aligner_params, **mods),
            "sequence": LibsSequence(**mods),
            "context": LibsContext(student_context_key, teacher_context_key, context_aligner,
                                   context_params(aligner, aligner_params, context_aligner, context_aligner_params),
                                   **mods),
        }

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        batch, parts = self.filtered(teacher, batch)
        total = None
        for key, term in self.terms.items():
            if self.weights[key] == 0:
                continue
            value = sample_weighted_mean(term.per_sample(student, teacher), batch)
            parts[key] = value
            total = self.weights[key] * value if total is None else total + self.weights[key] * value
        if total is None:
            raise ConfigError("loss 'libs': frame_weight, sequence_weight and context_weight are all 0")
        return LossOutput(total, parts)

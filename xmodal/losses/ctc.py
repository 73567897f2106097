"""Sequence recognition losses: supervised CTC, attention-decoder cross-entropy, and CTC distillation.

Batch conventions: `batch["targets"]` long [B, L] padded with -1, optional `batch["target_lengths"]` [B].
A sample with target length 0 has no transcript and is skipped by the supervised losses (`ctc`,
`attention_ce`); their values average over the samples that have one, and each reports how many it saw as
the part `labelled` (a batch without any contributes a graph-connected 0 with `labelled` 0, visible in the
logs; a data set without any transcript is refused before training by the job). The hybrid CTC/attention
objective is `ctc` and `attention_ce` in the loss list with weights λ and 1 − λ.

A CTC target needs at least `len(y) + (number of equal neighbours in y)` input frames (a blank must separate
repeated labels). Samples below that have no alignment: they are left out of the mean (not averaged in as 0),
counted in the part `infeasible` and logged by id; a `ctc` batch whose labelled samples are all infeasible is
a DataError, since its loss would be an empty 0.

`ctc_kd` (Afouras et al., 2020) needs no ground truth: the teacher's greedy CTC transcript is the CTC
pseudo-label, and frame-wise KL(p_T ‖ p_S) to the teacher's CTC posteriors, brought to the video frame rate
by an aligner ("time" by default: relative-time averaging of posteriors), adds a dense signal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.errors import ConfigError, DataError
from xmodal.features import Features
from xmodal.losses.base import DistillLoss, LossOutput, Outputs, register_loss, sample_weighted_mean
from xmodal.seqalign import ALIGNERS, IGNORE_ID, ctc_greedy, decoder_io, pad_sequences, target_lengths

log = logging.getLogger(__name__)


def _targets(batch: Mapping | None, name: str) -> tuple[Tensor, Tensor]:
    if batch is None or "targets" not in batch:
        raise ConfigError(f"loss '{name}' needs batch['targets'] (label ids [B, L] padded with -1)")
    targets = batch["targets"]
    return targets, target_lengths(targets, batch.get("target_lengths"))


def input_lengths(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Real frames per sample [B] of per-frame logits [B, T, V]."""
    if mask is None:
        return torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
    return mask.sum(1).long()


def ctc_min_frames(targets: Tensor, lengths: Tensor) -> Tensor:
    """Fewest input frames a CTC alignment of each target needs [B]: its length plus one blank between every
    pair of equal neighbouring labels."""
    real = torch.arange(targets.shape[1], device=targets.device)[None, :] < lengths[:, None]
    repeats = (targets[:, 1:] == targets[:, :-1]) & real[:, 1:]
    return lengths.long() + repeats.sum(1)


def ctc_per_sample(logits: Tensor, mask: Tensor | None, targets: Tensor, lengths: Tensor, blank: int) -> Tensor:
    """CTC loss per sample [B], divided by the target length (≥ 1); infeasible alignments give 0 (callers leave
    them out by `ctc_min_frames`)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T, B, V]
    in_len = input_lengths(logits, mask)
    flat = targets.clamp_min(0)  # padded entries are ignored through the lengths
    loss = F.ctc_loss(log_probs, flat, in_len.long(), lengths.long(), blank=blank, reduction="none",
                      zero_infinity=True)
    return loss / lengths.clamp_min(1).to(loss.dtype)


def _mean_over(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of values over `keep`; a graph-connected zero when nothing is kept."""
    if not bool(keep.any()):
        return values.sum() * 0.0
    return values[keep].mean()


def _weighted_mean_over(values: Tensor, keep: Tensor, batch: Mapping | None) -> Tensor:
    """`sample_weighted_mean` over the kept samples only; a graph-connected zero when nothing is kept."""
    weight = None if batch is None else batch.get("sample_weight")
    weight = torch.ones_like(values) if weight is None else weight.to(values)
    weight = weight * keep.to(values.dtype)
    if not bool((weight > 0).any()):
        return values.sum() * 0.0
    return sample_weighted_mean(values, {"sample_weight": weight})


def _ids(batch: Mapping | None, which: Tensor) -> list:
    """Sample ids (batch["ids"], else batch positions) where `which` is True."""
    rows = which.nonzero().flatten().tolist()
    ids = None if batch is None else batch.get("ids")
    return [ids[i] for i in rows] if ids is not None and len(ids) == len(which) else rows


class _InfeasibleLog:
    """Warns once per sample id about CTC targets too long for their input."""

    def __init__(self, name: str):
        self.name, self.seen = name, set()

    def __call__(self, batch: Mapping | None, infeasible: Tensor, frames: Tensor, needed: Tensor) -> None:
        rows = infeasible.nonzero().flatten().tolist()
        ids = _ids(batch, infeasible)
        new = [(sid, int(frames[r]), int(needed[r])) for sid, r in zip(ids, rows) if sid not in self.seen]
        if new:
            self.seen.update(sid for sid, _, _ in new)
            shown = ", ".join(f"{sid!r} ({f} frames, needs {n})" for sid, f, n in new[:5])
            log.warning("loss '%s': %d sample(s) have a target longer than their input allows and are left out of "
                        "the mean: %s%s", self.name, len(new), shown, " ..." if len(new) > 5 else "")


@register_loss("ctc")
class CTCLoss(DistillLoss):
    """Supervised CTC on `batch["targets"]` from the student's per-frame logits [B, T, V] and mask."""

    supervised = True  # reads reference transcripts: a data set without any is refused before training

    def __init__(self, modality: str = "video", blank: int = 0):
        super().__init__()
        self.modality, self.blank = modality, blank
        self._warn = _InfeasibleLog(self.name)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        fs = self.pick(student, self.modality, "student")
        if fs.logits is None or fs.logits.dim() != 3:
            raise ValueError(f"loss '{self.name}' needs per-frame logits [B, T, V] for '{self.modality}'")
        targets, lengths = _targets(batch, self.name)
        targets, lengths = targets.to(fs.logits.device), lengths.to(fs.logits.device)
        per = ctc_per_sample(fs.logits, fs.mask, targets, lengths, self.blank)
        labelled = lengths > 0
        frames, needed = input_lengths(fs.logits, fs.mask), ctc_min_frames(targets, lengths)
        infeasible = labelled & (frames < needed)
        keep = labelled & ~infeasible
        if bool(infeasible.any()):
            if not bool(keep.any()):
                shown = ", ".join(f"{sid!r} ({int(frames[r])} frames, needs {int(needed[r])})" for sid, r in
                                  zip(_ids(batch, infeasible), infeasible.nonzero().flatten().tolist()))
                raise DataError(
                    f"loss '{self.name}': no labelled sample of this batch has a CTC alignment (each transcript is "
                    f"longer than its input allows): {shown}; use shorter transcripts, longer inputs or less "
                    "temporal subsampling"
                )
            self._warn(batch, infeasible, frames, needed)
        parts = {"labelled": labelled.sum().float(), "infeasible": infeasible.sum().float()}
        return LossOutput(_mean_over(per, keep), parts)


@register_loss("attention_ce")
class AttentionCE(DistillLoss):
    """Cross-entropy with label smoothing of teacher-forced decoder logits against `targets` + <eos>.

    Reads `student[key].logits` [B, L+1, V] as produced by a context adapter (decoder inputs <sos> + y).
    """

    supervised = True  # reads reference transcripts: a data set without any is refused before training

    def __init__(self, key: str = "video_context", label_smoothing: float = 0.1, eos: int = 1, sos: int = 1):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss 'attention_ce': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.key, self.label_smoothing, self.eos, self.sos = key, label_smoothing, eos, sos

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        fs = self.pick(student, self.key, "student")
        if fs.logits is None or fs.logits.dim() != 3:
            raise ValueError(f"loss '{self.name}' needs decoder logits [B, L+1, V] in '{self.key}'")
        targets, lengths = _targets(batch, self.name)
        _, out, _ = decoder_io(targets.to(fs.logits.device), self.sos, self.eos, lengths.to(fs.logits.device))
        if out.shape != fs.logits.shape[:2]:
            raise ValueError(
                f"loss '{self.name}': decoder logits {list(fs.logits.shape)} do not match targets + <eos> "
                f"{list(out.shape)}; run the decoder teacher-forced on the same batch['targets']"
            )
        ce = F.cross_entropy(fs.logits.float().transpose(1, 2), out, ignore_index=IGNORE_ID,
                             label_smoothing=self.label_smoothing, reduction="none")  # [B, L+1]
        n = (out != IGNORE_ID).sum(1)
        per = ce.sum(1) / n.clamp_min(1)
        acc = ((fs.logits.argmax(-1) == out) & (out != IGNORE_ID)).sum() / n.sum().clamp_min(1)
        labelled = lengths > 0
        return LossOutput(_mean_over(per, labelled), {"acc": acc.detach().float(),
                                                      "labelled": labelled.sum().float()})


def teacher_pseudo_labels(teacher: Features, blank: int = 0) -> tuple[Tensor, Tensor]:
    """The teacher's greedy CTC transcripts as padded targets [B, L] (-1 padding) and lengths [B]."""
    if teacher.logits is None or teacher.logits.dim() != 3:
        raise ValueError("CTC distillation needs the teacher's CTC logits [B, T, V] in its Features.logits")
    hyps = ctc_greedy(teacher.logits, teacher.mask, blank)
    targets = pad_sequences(hyps, IGNORE_ID, teacher.logits.device)
    return targets, torch.tensor([len(h) for h in hyps], dtype=torch.long, device=teacher.logits.device)


@register_loss("ctc_kd")
class CTCDistill(DistillLoss):
    """Afouras et al.: ctc_weight·CTC(student, teacher greedy transcript) + kl_weight·T²·mean_j KL(p_T,j ‖ p_S,j).

    Teacher posteriors (softmax at temperature T) are aligned to the video frames by `aligner`; the KL
    averages over real video frames. Empty teacher transcripts are valid CTC targets (all blank). Samples whose
    teacher transcript is longer than the student's input allows are left out of the CTC term, counted in the
    part `ctc_infeasible` and logged.
    """

    def __init__(
        self,
        student_modality: str = "video",
        teacher_modality: str = "audio",
        ctc_weight: float = 1.0,
        kl_weight: float = 1.0,
        temperature: float = 1.0,
        aligner: str = "time",
        aligner_params: dict | None = None,
        blank: int = 0,
    ):
        super().__init__()
        self.student_modality, self.teacher_modality = student_modality, teacher_modality
        self.ctc_weight, self.kl_weight, self.temperature = ctc_weight, kl_weight, temperature
        self.aligner = ALIGNERS.build(aligner, **(aligner_params or {}))
        self.blank = blank
        self._warn = _InfeasibleLog(self.name)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        fs = self.pick(student, self.student_modality, "student")
        ft = self.pick(teacher, self.teacher_modality, "teacher").detach()
        if fs.logits is None or fs.logits.dim() != 3:
            raise ValueError(f"loss '{self.name}' needs the student's per-frame logits [B, T, V]")
        targets, lengths = teacher_pseudo_labels(ft, self.blank)
        if ft.logits.shape[-1] != fs.logits.shape[-1]:
            raise ValueError(
                f"loss '{self.name}': teacher vocabulary {ft.logits.shape[-1]} vs student {fs.logits.shape[-1]}; "
                "both must use the same label set"
            )
        parts = {}
        total = fs.logits.new_zeros(())
        if self.ctc_weight:
            ctc = ctc_per_sample(fs.logits, fs.mask, targets, lengths, self.blank)
            frames, needed = input_lengths(fs.logits, fs.mask), ctc_min_frames(targets, lengths)
            infeasible = frames < needed
            if bool(infeasible.any()):
                self._warn(batch, infeasible, frames, needed)
            parts["ctc"] = _weighted_mean_over(ctc, ~infeasible, batch)
            parts["ctc_infeasible"] = infeasible.sum().float()
            total = total + self.ctc_weight * parts["ctc"]
        if self.kl_weight:
            t = self.temperature
            p_t = torch.softmax(ft.logits.float() / t, dim=-1)
            aligned = self.aligner(ft, fs, p_t)
            log_p_s = torch.log_softmax(fs.logits.float() / t, dim=-1)
            p = aligned.values
            kl = (p * (torch.log(p.clamp_min(1e-12)) - log_p_s)).sum(-1) * t * t  # [B, Tv]
            m = (aligned.mask & fs.mask).to(kl.dtype)
            per = (kl * m).sum(1) / m.sum(1).clamp_min(1.0)
            parts["kl"] = sample_weighted_mean(per, batch)
            total = total + self.kl_weight * parts["kl"]
        return LossOutput(total, parts)

"""DCD retrieval distillation: the teacher ranks candidate negatives, keeps the hardest, and the student
mimics the teacher's score distribution over positive + hard negatives, weighted by teacher confidence.

For query i with candidates c (its positive document first, then the k negatives the teacher scores
highest), scores are `z = τ·norm(q)·norm(d)ᵀ` for each model and
`L_i = T²·KL(softmax(z_T,i / T) ‖ softmax(z_S,i / T))`,
`w_i = 1 − H(softmax(z_T,i / T)) / log(k + 1)` (normalised entropy: a confident teacher counts more),
`L = Σ w_i·L_i / Σ w_i`. Candidates are the (globally gathered) in-batch documents plus optional extra
negatives in `batch["negatives"]` = {"student": [M, D_s] or [B, M, D_s], "teacher": [M, D_t] or [B, M, D_t]}
that a data pipeline may add. Each model scores with its own native features, so widths may differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.distributed import gather_no_grad, gather_with_grad, is_distributed, rank
from xmodal.errors import ConfigError
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss

WEIGHTINGS = ("entropy", "none")


def _extra_scores(q: Tensor, negatives: Tensor, scale: float) -> Tensor:
    """Scores of each query against shared [M, D] or per-query [B, M, D] extra negatives → [B, M]."""
    negatives = F.normalize(negatives.float(), dim=-1)
    if negatives.dim() == 2:
        return scale * q @ negatives.t()
    if negatives.dim() == 3 and negatives.shape[0] == q.shape[0]:
        return scale * torch.einsum("bd,bmd->bm", q, negatives)
    raise ValueError(
        f"batch['negatives'] must be [M, D] (shared) or [B, M, D] with B={q.shape[0]}, got {list(negatives.shape)}"
    )


@register_loss("dcd")
class DCDLoss(DistillLoss):
    """Teacher-ranked hard negatives with entropy weighting (see the module docstring for the formula)."""

    def __init__(
        self,
        query: str = "text",
        doc: str = "image",
        num_negatives: int = 8,
        temperature: float = 1.0,
        scale: float = 20.0,
        teacher_scale: float | None = None,
        weighting: str = "entropy",
    ):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"dcd: weighting must be one of {', '.join(WEIGHTINGS)}, got '{weighting}'")
        if num_negatives < 1:
            raise ConfigError(f"dcd: num_negatives must be at least 1, got {num_negatives}")
        if temperature <= 0:
            raise ConfigError(f"dcd: temperature must be positive, got {temperature}")
        self.query, self.doc = query, doc
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.scale = float(scale)
        self.teacher_scale = float(teacher_scale if teacher_scale is not None else scale)
        self.weighting = weighting

    def needs(self) -> list[Need]:
        return [Need(role, m) for role in ("student", "teacher") for m in (self.query, self.doc)]

    def candidate_scores(
        self, student: Outputs, teacher: Outputs, batch: Mapping | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Student and teacher scores [B, N] over all candidates, and each query's positive column [B]."""
        sq = F.normalize(self.pick(student, self.query, "student").pooled.float(), dim=-1)
        sd = F.normalize(self.pick(student, self.doc, "student").pooled.float(), dim=-1)
        with torch.no_grad():
            tq = F.normalize(self.pick(teacher, self.query, "teacher").pooled.detach().float(), dim=-1)
            td = F.normalize(self.pick(teacher, self.doc, "teacher").pooled.detach().float(), dim=-1)
        if sq.shape[0] != tq.shape[0] or sd.shape[0] != td.shape[0]:
            raise ValueError(
                f"dcd: student and teacher batch sizes differ ({sq.shape[0]} vs {tq.shape[0]} queries, "
                f"{sd.shape[0]} vs {td.shape[0]} documents)"
            )
        if sq.shape[0] != sd.shape[0]:
            raise ValueError(f"dcd: {sq.shape[0]} queries but {sd.shape[0]} documents; pairs must align")
        offset = rank() * sd.shape[0] if is_distributed() else 0
        s_scores = self.scale * sq @ gather_with_grad(sd).t()
        with torch.no_grad():
            t_scores = self.teacher_scale * tq @ gather_no_grad(td).t()
        negatives = None if batch is None else batch.get("negatives")
        if negatives is not None:
            if not isinstance(negatives, Mapping) or not {"student", "teacher"} <= set(negatives):
                raise ValueError("dcd: batch['negatives'] must be a mapping with 'student' and 'teacher' tensors")
            s_neg = _extra_scores(sq, negatives["student"], self.scale)
            with torch.no_grad():
                t_neg = _extra_scores(tq, negatives["teacher"].detach(), self.teacher_scale)
            if s_neg.shape != t_neg.shape:
                raise ValueError(
                    f"dcd: student negatives give {list(s_neg.shape)} scores, teacher negatives {list(t_neg.shape)}"
                )
            s_scores = torch.cat([s_scores, s_neg], dim=1)
            t_scores = torch.cat([t_scores, t_neg], dim=1)
        positives = torch.arange(sq.shape[0], device=sq.device) + offset
        return s_scores, t_scores, positives

    def select(self, t_scores: Tensor, positives: Tensor) -> Tensor:
        """Candidate columns [B, 1 + k]: the positive, then the k negatives the teacher scores highest."""
        k = min(self.num_negatives, t_scores.shape[1] - 1)
        masked = t_scores.scatter(1, positives[:, None], -torch.inf)
        hard = torch.topk(masked, k, dim=1).indices
        return torch.cat([positives[:, None], hard], dim=1)

    def per_query(self, student: Outputs, teacher: Outputs, batch: Mapping | None = None) -> tuple[Tensor, Tensor]:
        """Per-query T²·KL over positive + hard negatives [B] and the teacher-confidence weights [B]."""
        s_scores, t_scores, positives = self.candidate_scores(student, teacher, batch)
        if t_scores.shape[1] < 2:  # a single pair and no extra negatives: nothing to rank
            return s_scores.sum(dim=1) * 0.0, torch.ones(s_scores.shape[0], device=s_scores.device)
        cols = self.select(t_scores, positives)
        t = self.temperature
        log_p_t = torch.log_softmax(t_scores.gather(1, cols) / t, dim=1)
        log_p_s = torch.log_softmax(s_scores.gather(1, cols) / t, dim=1)
        p_t = log_p_t.exp()
        kl = (p_t * (log_p_t - log_p_s)).sum(dim=1) * t * t
        if self.weighting == "entropy":
            entropy = -(p_t * log_p_t).sum(dim=1)
            weight = (1.0 - entropy / math.log(cols.shape[1])).clamp_min(0.0)
        else:
            weight = torch.ones_like(kl)
        return kl, weight

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        kl, weight = self.per_query(student, teacher, batch)
        sample_weight = None if batch is None else batch.get("sample_weight")
        if sample_weight is not None:
            if sample_weight.shape != weight.shape:
                raise ValueError(f"sample_weight has shape {list(sample_weight.shape)}, expected {list(weight.shape)}")
            weight = weight * sample_weight.to(weight)
        loss = (weight * kl).sum() / weight.sum().clamp_min(1e-12)
        return LossOutput(loss, {"kl": kl.mean().detach(), "weight": weight.mean().detach()})

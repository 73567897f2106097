"""Ranking distillation for retrieval: Margin-MSE on (query, positive, negative) triples and a listwise KL over
the candidates the teacher ranks highest.

Scores are `S(q, d) = scale·⟨q, d⟩` (cosine when `normalize`) from each model's own native features, so widths
may differ. A query's positive is its pair in the batch (query i with document i); hard negatives come from a
`negative` modality (the document encoder applied to one mined negative per query, [B, D]) or, without one,
from the in-batch documents. Teacher scores are detached: gradients reach the student only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.distributed import gather_no_grad, gather_with_grad
from xmodal.errors import ConfigError, DataError
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss, sample_weighted_mean
from xmodal.losses.logit import check_positive, kl_div


class _ScoringLoss(DistillLoss):
    """Query/document scoring shared by the ranking losses."""

    def __init__(self, query: str, doc: str, negative: str | None, normalize: bool, scale: float,
                 teacher_scale: float | None):
        super().__init__()
        check_positive(self.name, scale=scale)
        if teacher_scale is not None:
            check_positive(self.name, teacher_scale=teacher_scale)
        self.query, self.doc, self.negative = query, doc, negative
        self.normalize = bool(normalize)
        self.scale = float(scale)
        self.teacher_scale = float(teacher_scale if teacher_scale is not None else scale)

    def modalities(self) -> list[str]:
        return [self.query, self.doc] + ([self.negative] if self.negative else [])

    def embed(self, outputs: Outputs | None, modality: str, role: str) -> Tensor:
        x = self.pick(outputs, modality, role).pooled.float()
        if role == "teacher":
            x = x.detach()
        return F.normalize(x, dim=-1) if self.normalize else x

    def embeddings(self, outputs: Outputs | None, role: str) -> tuple[Tensor, Tensor, Tensor | None]:
        q, d = self.embed(outputs, self.query, role), self.embed(outputs, self.doc, role)
        neg = self.embed(outputs, self.negative, role) if self.negative else None
        for name, x in ((self.doc, d), (self.negative, neg)):
            if x is not None and x.shape[0] != q.shape[0]:
                raise DataError(
                    f"loss '{self.name}': {q.shape[0]} {self.query} queries but {x.shape[0]} {name} rows from the "
                    f"{role}; each query needs its own positive (and negative)"
                )
        return q, d, neg


@register_loss("margin_mse")
class MarginMSE(_ScoringLoss):
    """mean_i [(S(q_i,d⁺_i) − S(q_i,d⁻_i)) − (T(q_i,d⁺_i) − T(q_i,d⁻_i))]² (Hofstätter et al., 2020, "Improving
    Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation").

    d⁻ is the `negative` modality's row i; without one, the in-batch document the teacher scores highest for q_i
    among the others. `teacher_scores` names a batch key of precomputed teacher scores [B, 2] (positive,
    negative; e.g. a cross-encoder's), which then replace the teacher's embeddings (a negative modality is needed).
    Zero when the student's margins equal the teacher's.
    """

    def __init__(
        self,
        query: str = "text",
        doc: str = "image",
        negative: str | None = None,
        normalize: bool = False,
        scale: float = 1.0,
        teacher_scale: float | None = None,
        teacher_scores: str | None = None,
    ):
        super().__init__(query, doc, negative, normalize, scale, teacher_scale)
        if teacher_scores and not negative:
            raise ConfigError(
                f"loss '{self.name}': teacher_scores gives the teacher's scores of each query's own negative, so "
                "set negative to the modality that holds those negatives"
            )
        self.teacher_scores = teacher_scores

    def needs(self) -> list[Need]:
        needs = [Need("student", m) for m in self.modalities()]
        if not self.teacher_scores:
            needs += [Need("teacher", m) for m in self.modalities()]
        return needs

    def batch_keys(self) -> list[str]:
        return [self.teacher_scores] if self.teacher_scores else []

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        sq, sd, sn = self.embeddings(student, "student")
        s_pos = self.scale * (sq * sd).sum(dim=-1)
        if self.teacher_scores:
            t_pos, t_neg = self._given_scores(batch, sq.shape[0], sq.device)
            s_neg = self.scale * (sq * sn).sum(dim=-1)
        else:
            with torch.no_grad():
                tq, td, tn = self.embeddings(teacher, "teacher")
                t_pos = self.teacher_scale * (tq * td).sum(dim=-1)
            if tn is not None:
                s_neg = self.scale * (sq * sn).sum(dim=-1)
                with torch.no_grad():
                    t_neg = self.teacher_scale * (tq * tn).sum(dim=-1)
            else:
                if sq.shape[0] < 2:
                    raise DataError(f"loss '{self.name}' without a negative modality needs at least 2 pairs per batch")
                with torch.no_grad():
                    t_all = self.teacher_scale * tq @ td.t()
                    t_all.fill_diagonal_(float("-inf"))
                    t_neg, hardest = t_all.max(dim=1)
                s_neg = self.scale * (sq * sd[hardest]).sum(dim=-1)
        per = ((s_pos - s_neg) - (t_pos - t_neg)).pow(2)
        margin_s = (s_pos - s_neg).detach().mean()
        return LossOutput(sample_weighted_mean(per, batch), {"student_margin": margin_s,
                                                             "teacher_margin": (t_pos - t_neg).mean()})

    def _given_scores(self, batch: Mapping | None, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = self.teacher_scores
        if batch is None or key not in batch:
            have = ", ".join(map(str, batch)) if batch else "none"
            raise DataError(f"loss '{self.name}' reads teacher scores from batch['{key}'], but the batch has: {have}")
        scores = torch.as_tensor(batch[key], device=device).float()
        if tuple(scores.shape) != (n, 2):
            raise DataError(f"loss '{self.name}': batch['{key}'] must be [B, 2] = {[n, 2]} (positive, negative), "
                            f"got {list(scores.shape)}")
        return scores[:, 0], scores[:, 1]


@register_loss("listwise_kl")
class ListwiseKL(_ScoringLoss):
    """mean_i T²·KL(softmax(T_i[C_i] / T) ‖ softmax(S_i[C_i] / T)), C_i the top_k candidates the teacher ranks
    highest for query i (listwise distillation as in RocketQAv2, Ren et al., 2021).

    Candidates are the (globally gathered) in-batch documents, plus the `negative` modality's rows when given;
    top_k null keeps them all. Zero when the student's scores equal the teacher's on the kept candidates.
    """

    def __init__(
        self,
        query: str = "text",
        doc: str = "image",
        negative: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        normalize: bool = True,
        scale: float = 20.0,
        teacher_scale: float | None = None,
    ):
        super().__init__(query, doc, negative, normalize, scale, teacher_scale)
        check_positive(self.name, temperature=temperature)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 2):
            raise ConfigError(f"loss '{self.name}': top_k must be an integer of at least 2 (or null), got {top_k!r}")
        self.top_k = top_k
        self.temperature = float(temperature)

    def needs(self) -> list[Need]:
        return [Need(role, m) for role in ("student", "teacher") for m in self.modalities()]

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        sq, sd, sn = self.embeddings(student, "student")
        with torch.no_grad():
            tq, td, tn = self.embeddings(teacher, "teacher")
        if sq.shape[0] != tq.shape[0]:
            raise DataError(
                f"loss '{self.name}': student and teacher batch sizes differ ({sq.shape[0]}, {tq.shape[0]})")
        s_docs = [gather_with_grad(sd)] + ([gather_with_grad(sn)] if sn is not None else [])
        s_scores = self.scale * sq @ torch.cat(s_docs).t()
        with torch.no_grad():
            t_docs = [gather_no_grad(td)] + ([gather_no_grad(tn)] if tn is not None else [])
            t_scores = self.teacher_scale * tq @ torch.cat(t_docs).t()
        if t_scores.shape[1] < 2:
            raise DataError(f"loss '{self.name}' needs at least 2 candidates per query (a batch of 2 pairs, or a "
                            "negative modality)")
        if self.top_k is not None and self.top_k < t_scores.shape[1]:
            cols = t_scores.topk(self.top_k, dim=1).indices
            s_scores, t_scores = s_scores.gather(1, cols), t_scores.gather(1, cols)
        t = self.temperature
        per = kl_div(torch.log_softmax(t_scores / t, dim=1), torch.log_softmax(s_scores / t, dim=1)) * t * t
        return LossOutput(sample_weighted_mean(per, batch))

"""DCD retrieval distillation: the teacher ranks candidate negatives, keeps the hardest, and the student
mimics the teacher's score distribution over positive + hard negatives, weighted by teacher confidence.

For query i with candidates c (its positive document first, then the k negatives the teacher scores
highest), scores are `z = τ·norm(q)·norm(d)ᵀ` for each model and
`L_i = T²·KL(softmax(z_T,i / T) ‖ softmax(z_S,i / T))`,
`w_i = 1 − H(softmax(z_T,i / T)) / log(k + 1)` (normalised entropy: a confident teacher counts more),
`L = Σ w_i·L_i / Σ w_i`. Candidates are the (globally gathered) in-batch documents plus optional extra
negatives in `batch["negatives"]` = {"student": [M, D_s] or [B, M, D_s], "teacher": [M, D_t] or [B, M, D_t]},
e.g. mined by `HardNegativeMiner` from a faiss index over the teacher cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.distributed import gather_no_grad, gather_with_grad, is_distributed, rank
from xmodal.errors import ConfigError, DataError
from xmodal.losses.base import DistillLoss, LossOutput, Outputs, register_loss

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


class HardNegativeMiner:
    """Teacher-ranked hard negatives from a faiss index over the teacher cache's document embeddings.

    `mine(teacher_queries, k, positives)` returns the ids [B, k] of the k documents the teacher scores
    highest for each query, leaving out its positives; `teacher_embeddings(ids)` fetches their cached rows
    for `batch["negatives"]["teacher"]`.
    """

    def __init__(self, doc_embeddings, *, normalize: bool = True, index: str = "flat", hnsw_m: int = 32,
                 ef_search: int = 128):
        import faiss

        docs = doc_embeddings.detach().cpu().numpy() if isinstance(doc_embeddings, Tensor) else doc_embeddings
        if getattr(docs, "ndim", 0) != 2 or docs.shape[0] == 0:
            raise DataError(f"hard-negative miner needs a non-empty [N, D] matrix, got shape {list(docs.shape)}")
        self.docs = docs
        self.normalize = normalize
        dim = int(docs.shape[1])
        if index == "flat":
            self.index = faiss.IndexFlatIP(dim)
        elif index == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        else:
            raise ConfigError(f"hard-negative miner index must be 'flat' or 'hnsw', got '{index}'")
        for start in range(0, docs.shape[0], 65536):
            self.index.add(self._prepare(docs[start : start + 65536], "document"))

    def _prepare(self, x, what: str) -> np.ndarray:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, Tensor) else x.detach().float())
        x = x.cpu()
        if not torch.isfinite(x).all():
            bad = int(torch.nonzero(~torch.isfinite(x).all(dim=1))[0, 0])
            raise DataError(f"hard-negative miner: {what} row {bad} holds NaN or infinite values")
        if self.normalize:
            x = F.normalize(x, dim=1)
        return np.ascontiguousarray(x.numpy())

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def mine(self, teacher_queries, k: int, positives: Sequence | Tensor | None = None) -> Tensor:
        """Ids [B, k] of each query's k highest-scoring documents that are not among its positives."""
        q = self._prepare(teacher_queries, "query")
        if q.shape[1] != self.index.d:
            raise DataError(f"hard-negative miner: queries have dim {q.shape[1]}, the index holds dim {self.index.d}")
        if positives is None:
            pos = [set() for _ in range(len(q))]
        elif isinstance(positives, Tensor) and positives.dim() == 1:
            pos = [{int(p)} for p in positives.tolist()]
        else:
            pos = [set(np.atleast_1d(np.asarray(p)).tolist()) for p in positives]
        if len(pos) != len(q):
            raise ValueError(f"hard-negative miner: {len(q)} queries but {len(pos)} positive sets")
        width = k + max((len(p) for p in pos), default=0)
        if width > len(self):
            raise ConfigError(f"hard-negative miner: asked for {k} negatives but the index holds {len(self)} documents")
        _, ids = self.index.search(q, width)
        out = np.empty((len(q), k), dtype=np.int64)
        for i, (row, p) in enumerate(zip(ids, pos)):
            kept = [j for j in row.tolist() if j >= 0 and j not in p][:k]
            if len(kept) < k:
                raise ConfigError(f"hard-negative miner: only {len(kept)} negatives found for query {i}, wanted {k}")
            out[i] = kept
        return torch.from_numpy(out)

    def teacher_embeddings(self, ids: Tensor) -> Tensor:
        """Cached teacher rows for `ids` (any shape) as fp32, e.g. [B, k, D] for batch["negatives"]["teacher"]."""
        flat = ids.reshape(-1).cpu().numpy()
        rows = np.asarray(self.docs[flat], dtype=np.float32)
        return torch.from_numpy(rows).view(*ids.shape, -1)

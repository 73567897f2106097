"""Relation distillation: RKD distance and angle, batch similarity (SP) and batch affinity, within one modality.

A relation loss compares how vectors relate to each other inside a group, so student and teacher widths may
differ and each model's native features are used. `level` picks the vectors: `pooled` or `logits` relate the
samples of the batch (samples whose `sample_weight` is 0 are left out); `tokens` (or per-step logits) relate the
real tokens of each sample, averaged over samples with `batch["sample_weight"]`. Teacher values are detached.
Every relation here is invariant to a global scale of either model's features, and the batch-level value is
invariant to the order of the samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss
from xmodal.losses.logit import check_positive, kept_samples, step_mask

LEVELS = ("pooled", "tokens", "logits")


def level_values(f: Features, level: str) -> tuple[Tensor, Tensor | None]:
    """The vectors a loss reads at `level` ([B, D] or [B, T, D]) and the [B, T] mask of real steps (or None)."""
    if level == "pooled":
        return f.pooled, None
    if level == "tokens":
        return f.tokens, f.mask
    return f.logits, step_mask(f.logits, f)


def masked_mean(values: Tensor, mask: Tensor, dims: tuple[int, ...]) -> Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)


def rescale(x: Tensor) -> Tensor:
    """x divided by its (detached) largest magnitude per group: keeps Gram matrices in range for logits of 1e4;
    free for the scale-invariant relations here."""
    return x / x.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)


class RelationLoss(DistillLoss):
    """Per modality: a relation of the vectors in each group [G, N, D] with real-row mask [G, N], student vs
    teacher; groups with fewer than `min_rows` real rows have no relation and are left out."""

    min_rows = 2

    def __init__(self, modalities: Sequence[str] = ("image",), level: str = "pooled"):
        super().__init__()
        if level not in LEVELS:
            raise ConfigError(f"loss '{self.name}': level must be one of {', '.join(LEVELS)}, got '{level}'")
        if isinstance(modalities, str):
            modalities = [modalities]
        self.modalities = list(modalities)
        self.level = level

    def needs(self) -> list[Need]:
        return [Need(role, m, self.level) for role in ("student", "teacher") for m in self.modalities]

    def relation(self, xs: Tensor, xt: Tensor, mask: Tensor) -> Tensor:
        """Per-group loss [G] from student [G, N, Ds] and detached teacher [G, N, Dt] vectors (float32)."""
        raise NotImplementedError

    def groups(self, fs: Features, ft: Features, modality: str, batch: Mapping | None):
        """Student and teacher groups, their real-row mask, and per-group weights ([1] for the batch, else [B])."""
        xs, ms = level_values(fs, self.level)
        xt, mt = level_values(ft, self.level)
        if xs.shape[:-1] != xt.shape[:-1] or xs.dim() != xt.dim():
            raise ConfigError(
                f"loss '{self.name}' on '{modality}' {self.level}: student {list(xs.shape)} and teacher "
                f"{list(xt.shape)} must hold the same samples (and tokens); widths may differ"
            )
        xs, xt = xs.float(), xt.detach().float()
        b = xs.shape[0]
        if xs.dim() == 2:  # the batch is one group
            keep = kept_samples(batch, b, xs.device)
            return xs[None], xt[None], keep[None], torch.ones(1, device=xs.device)
        mask = torch.ones(xs.shape[:2], dtype=torch.bool, device=xs.device)
        for m in (ms, mt):
            if m is not None:
                mask = mask & m.to(xs.device)
        weight = None if batch is None else batch.get("sample_weight")
        weight = torch.ones(b, device=xs.device) if weight is None else weight.to(xs.device).float()
        if tuple(weight.shape) != (b,):
            raise ValueError(f"sample_weight has shape {list(weight.shape)}, expected [{b}]")
        return xs, xt, mask, weight

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        parts = {}
        for modality in self.modalities:
            fs = self.pick_field(student, modality, "student", self.level)
            ft = self.pick_field(teacher, modality, "teacher", self.level)
            xs, xt, mask, weight = self.groups(fs, ft, modality, batch)
            valid = mask.sum(dim=1) >= self.min_rows
            values = self.relation(xs, xt, mask)
            w = weight * valid.to(weight.dtype)
            values = torch.where(valid, values, torch.zeros((), device=values.device))  # no NaN from empty groups
            parts[modality] = (values * w).sum() / w.sum().clamp_min(1e-12)
        total = torch.stack(list(parts.values())).sum()
        return LossOutput(total, parts if len(parts) > 1 else {})


def pair_mask(mask: Tensor) -> Tensor:
    """[G, N, N]: both rows real and distinct."""
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    return mask[:, :, None] & mask[:, None, :] & ~eye


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances [G, N, N] (clamped away from 0, so their gradient stays finite)."""
    sq = (x * x).sum(dim=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * x @ x.transpose(1, 2)
    return d2.clamp_min(1e-12).sqrt()


@register_loss("rkd_distance")
class RKDDistance(RelationLoss):
    """mean_{i≠j} Huber(‖s_i − s_j‖/μ_S, ‖t_i − t_j‖/μ_T), μ the mean pairwise distance (Park et al., 2019,
    "Relational Knowledge Distillation")."""

    def relation(self, xs: Tensor, xt: Tensor, mask: Tensor) -> Tensor:
        pairs = pair_mask(mask)

        def normalised(x: Tensor) -> Tensor:
            d = pairwise_distances(rescale(x))
            return d / masked_mean(d, pairs, (1, 2)).clamp_min(1e-12)[:, None, None]

        with torch.no_grad():
            dt = normalised(xt)
        ds = normalised(xs)
        return masked_mean(F.smooth_l1_loss(ds, dt, reduction="none"), pairs, (1, 2))


@register_loss("rkd_angle")
class RKDAngle(RelationLoss):
    """mean_{i,j,k distinct} Huber(⟨e_ij, e_kj⟩_S, ⟨e_ij, e_kj⟩_T), e_ij = norm(x_i − x_j) the direction from
    the vertex j (Park et al., 2019, "Relational Knowledge Distillation"). Memory grows as N³ per group."""

    min_rows = 3

    def relation(self, xs: Tensor, xt: Tensor, mask: Tensor) -> Tensor:
        n = mask.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=mask.device)
        real = mask[:, :, None, None] & mask[:, None, :, None] & mask[:, None, None, :]
        distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
        triplets = real & distinct  # [G, vertex j, i, k]

        def angles(x: Tensor) -> Tensor:
            x = rescale(x)
            e = F.normalize(x[:, None, :, :] - x[:, :, None, :], dim=-1)  # e[g, j, i] = norm(x_i − x_j)
            return e @ e.transpose(2, 3)  # [G, j, i, k]

        with torch.no_grad():
            at = angles(xt)
        a_s = angles(xs)
        return masked_mean(F.smooth_l1_loss(a_s, at, reduction="none"), triplets, (1, 2, 3))


@register_loss("batch_similarity")
class BatchSimilarity(RelationLoss):
    """‖norm_rows(S·Sᵀ) − norm_rows(T·Tᵀ)‖²_F / N²: the batch's similarity (Gram) matrices match
    (Tung & Mori, 2019, "Similarity-Preserving Knowledge Distillation")."""

    def relation(self, xs: Tensor, xt: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(xs.dtype)[:, :, None]

        def gram(x: Tensor) -> Tensor:
            x = rescale(x) * m
            return F.normalize(x @ x.transpose(1, 2), dim=-1)

        with torch.no_grad():
            gt = gram(xt)
        gs = gram(xs)
        n = mask.sum(dim=1).to(xs.dtype).clamp_min(1.0)
        return (gs - gt).pow(2).sum(dim=(1, 2)) / (n * n)


@register_loss("batch_affinity")
class BatchAffinity(RelationLoss):
    """mean_i KL(softmax_j≠i(τ_T·cos(t_i, t_j)) ‖ softmax_j≠i(τ_S·cos(s_i, s_j))): each sample's similarity
    distribution over the rest of the batch, single-modality affinity mimicking (CompRess, Abbasi Koohpayegani
    et al., 2020, with the batch as the memory)."""

    def __init__(
        self,
        modalities: Sequence[str] = ("image",),
        level: str = "pooled",
        scale: float = 10.0,
        teacher_scale: float | None = None,
    ):
        super().__init__(modalities, level)
        check_positive(self.name, scale=scale)
        if teacher_scale is not None:
            check_positive(self.name, teacher_scale=teacher_scale)
        self.scale = float(scale)
        self.teacher_scale = float(teacher_scale if teacher_scale is not None else scale)

    def relation(self, xs: Tensor, xt: Tensor, mask: Tensor) -> Tensor:
        pairs = pair_mask(mask)
        neg_inf = torch.full((), float("-inf"), device=xs.device)

        def log_affinity(x: Tensor, scale: float) -> Tensor:
            x = F.normalize(x, dim=-1)
            logits = torch.where(pairs, scale * x @ x.transpose(1, 2), neg_inf)
            rows = pairs.any(dim=-1, keepdim=True)  # rows with no partner: a dummy 0 keeps them finite
            return torch.log_softmax(torch.where(rows, logits, torch.zeros((), device=x.device)), dim=-1)

        with torch.no_grad():
            log_pt = log_affinity(xt, self.teacher_scale)
        log_ps = log_affinity(xs, self.scale)
        pt = log_pt.exp()
        terms = pt * torch.where(pairs, log_pt - log_ps, torch.zeros((), device=xs.device))
        return masked_mean(terms.sum(dim=-1), mask & pairs.any(dim=-1), (1,))

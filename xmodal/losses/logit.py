"""Logit distillation: Hinton KD, reverse KL, Jensen-Shannon and top-k KL, for [B, C] or masked [B, T, C] logits.

Also the shared plumbing of every logit loss (`LogitLoss`): both models' logits of one modality, temperature
scaling in float32 (fp16/bf16 inputs and logits of 1e4 stay finite), per-step values averaged over the real
steps of each sample (the student's and the teacher's masks, where they describe the logits' steps), then a
batch mean weighted by `batch["sample_weight"]`. Teacher logits are detached: gradients reach the student only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from xmodal.errors import ConfigError, DataError
from xmodal.features import Features
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss, sample_weighted_mean


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise p·(log p − log q), 0 where p = 0 (also when both are −inf, e.g. masked classes)."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return p * diff


def kl_div(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim, from log-probabilities, per position."""
    return kl_terms(log_p, log_q).sum(dim=-1)


def step_mask(logits: Tensor, *features: Features) -> Tensor | None:
    """[B, T] mask of real steps for per-step logits [B, T, C] (the AND of the masks that describe those steps);
    None for per-sample logits or when no mask matches."""
    if logits.dim() != 3:
        return None
    mask = None
    for f in features:
        if f.mask is not None and tuple(f.mask.shape) == tuple(logits.shape[:2]):
            m = f.mask.to(logits.device)
            mask = m if mask is None else mask & m
    return mask


def reduce_steps(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-sample values [B]: values as they are, or [B, T] averaged over each sample's real steps."""
    if values.dim() == 1:
        return values
    if mask is None:
        return values.mean(dim=1)
    m = mask.to(values.dtype)
    return (values * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def kept_samples(batch: Mapping | None, n: int, device: torch.device) -> Tensor:
    """[B] bool: the samples a batch-level loss uses (those whose `sample_weight` is not 0; all without weights)."""
    weight = None if batch is None else batch.get("sample_weight")
    if weight is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if tuple(weight.shape) != (n,):
        raise ValueError(f"sample_weight has shape {list(weight.shape)}, expected [{n}]")
    return weight.to(device) > 0


def real_rows(z: Tensor, mask: Tensor | None, keep: Tensor) -> Tensor:
    """Rows [N, C] of the kept samples' real positions, from [B, C] or [B, T, C] values."""
    if z.dim() == 2:
        return z[keep]
    rows = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if mask is None else mask
    return z[rows & keep[:, None]]


def batch_targets(batch: Mapping | None, label_key: str | None, teacher_logits: Tensor, name: str) -> Tensor:
    """Class targets shaped like the logits without their class dim: batch[label_key], or the teacher's argmax
    when `label_key` is None. A configured key the batch lacks is an error, never a silent fallback."""
    shape = tuple(teacher_logits.shape[:-1])
    if label_key is None:
        return teacher_logits.argmax(dim=-1)
    if batch is None or label_key not in batch:
        have = ", ".join(map(str, batch)) if batch else "none"
        raise DataError(
            f"loss '{name}' reads class labels from batch['{label_key}'], but the batch has keys: {have}; set "
            f"label_key to the key that holds them, or label_key: null to use the teacher's top class"
        )
    y = torch.as_tensor(batch[label_key], device=teacher_logits.device).long()
    if tuple(y.shape) != shape:
        raise DataError(f"loss '{name}': batch['{label_key}'] has shape {list(y.shape)}, expected {list(shape)}")
    classes = teacher_logits.shape[-1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DataError(
            f"loss '{name}': batch['{label_key}'] holds class ids from {int(y.min())} to {int(y.max())}, "
            f"but there are {classes} classes"
        )
    return y


def check_positive(name: str, **values: float) -> None:
    for key, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"loss '{name}': {key} must be a positive number, got {v!r}")


class LogitLoss(DistillLoss):
    """Base of the logit losses: the two models' logits of `modality`, as float32, teacher detached."""

    def __init__(self, modality: str = "image", temperature: float = 4.0):
        super().__init__()
        check_positive(self.name, temperature=temperature)
        self.modality = modality
        self.temperature = float(temperature)

    def needs(self) -> list[Need]:
        return [Need("student", self.modality, "logits"), Need("teacher", self.modality, "logits")]

    def logits(self, student: Outputs, teacher: Outputs | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Student logits, detached teacher logits (both float32) and the [B, T] mask of real steps (or None)."""
        fs = self.pick_field(student, self.modality, "student", "logits")
        ft = self.pick_field(teacher, self.modality, "teacher", "logits")
        if fs.logits.shape != ft.logits.shape:
            raise ConfigError(
                f"loss '{self.name}': student logits {list(fs.logits.shape)} and teacher logits "
                f"{list(ft.logits.shape)} differ in shape"
            )
        zs, zt = fs.logits.float(), ft.logits.detach().float()
        return zs, zt, step_mask(zs, fs, ft)


class DivergenceLoss(LogitLoss):
    """T²·D(p_T^T, p_S^T) per position for a divergence D of the two tempered distributions."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        t = self.temperature
        log_p_s = torch.log_softmax(zs / t, dim=-1)
        log_p_t = torch.log_softmax(zt / t, dim=-1)
        div = self.divergence(log_p_t, log_p_s) * t * t
        return LossOutput(sample_weighted_mean(reduce_steps(div, mask), batch))


@register_loss("hinton")
class HintonKD(DivergenceLoss):
    """T²·KL(p_T^T ‖ p_S^T) (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network")."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return kl_div(log_p_t, log_p_s)


@register_loss("reverse_kl")
class ReverseKL(DivergenceLoss):
    """T²·KL(p_S^T ‖ p_T^T): mode-seeking (as in MiniLLM, Gu et al., 2024)."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return kl_div(log_p_s, log_p_t)


@register_loss("js")
class JensenShannon(DivergenceLoss):
    """T²·½[KL(p_T‖m) + KL(p_S‖m)], m = ½(p_T + p_S) (generalised JSD, Agarwal et al., 2024)."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        # classes both models rule out (−inf) enter the logsumexp as 0 and leave as −inf: no NaN gradient
        both_out = torch.isneginf(log_p_t) & torch.isneginf(log_p_s)
        zero = torch.zeros((), dtype=log_p_s.dtype, device=log_p_s.device)
        stacked = torch.stack([torch.where(both_out, zero, log_p_t), torch.where(both_out, zero, log_p_s)])
        log_m = torch.where(both_out, -math.inf, torch.logsumexp(stacked, dim=0) - math.log(2.0))
        return 0.5 * (kl_div(log_p_t, log_m) + kl_div(log_p_s, log_m))


TAILS = ("lump", "uniform")


@register_loss("topk_kl")
class TopKKL(LogitLoss):
    """T²·KL(p̃_T ‖ p̃_S) where the teacher keeps its top-k probabilities (sparse KD, as in teacher logit caches).

    `tail: lump`: the mass outside the teacher's top k is one extra category for both models (zero when the
    student equals the teacher). `tail: uniform`: the teacher's tail mass is spread evenly over the other
    classes and compared with the full student distribution (zero when the student matches that target).
    """

    def __init__(self, modality: str = "image", temperature: float = 1.0, k: int = 8, tail: str = "lump"):
        super().__init__(modality, temperature)
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"loss '{self.name}': k must be a positive integer, got {k!r}")
        if tail not in TAILS:
            raise ConfigError(f"loss '{self.name}': tail must be one of {', '.join(TAILS)}, got '{tail}'")
        self.k = k
        self.tail = tail

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        t = self.temperature
        log_p_s = torch.log_softmax(zs / t, dim=-1)
        log_p_t = torch.log_softmax(zt / t, dim=-1)
        classes = zs.shape[-1]
        if self.k >= classes:  # nothing outside the top k: plain KL
            div = kl_div(log_p_t, log_p_s) * t * t
            return LossOutput(sample_weighted_mean(reduce_steps(div, mask), batch))
        k = self.k
        top = log_p_t.topk(k, dim=-1).indices
        in_top = torch.zeros_like(log_p_t, dtype=torch.bool).scatter_(-1, top, True)
        neg_inf = torch.full((), -math.inf, device=zs.device)
        if self.tail == "lump":
            # KL over k + 1 categories: the teacher's top k, and everything else lumped into one
            rest_t = torch.logsumexp(torch.where(in_top, neg_inf, log_p_t), dim=-1, keepdim=True)
            rest_s = torch.logsumexp(torch.where(in_top, neg_inf, log_p_s), dim=-1, keepdim=True)
            div = (kl_terms(torch.where(in_top, log_p_t, neg_inf), log_p_s).sum(dim=-1)
                   + kl_terms(rest_t, rest_s).squeeze(-1))
        else:
            rest_t = torch.logsumexp(torch.where(in_top, neg_inf, log_p_t), dim=-1, keepdim=True)
            spread = rest_t - math.log(classes - k)
            target = torch.where(in_top, log_p_t, spread.expand_as(log_p_t))
            div = kl_div(target, log_p_s)
        div = div * t * t
        return LossOutput(sample_weighted_mean(reduce_steps(div, mask), batch))

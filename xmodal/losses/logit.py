"""Logit distillation: Hinton KD, reverse KL and Jensen-Shannon, for [B, C] or masked [B, T, C] logits."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss, sample_weighted_mean


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim, from log-probabilities, per position."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


class _LogitLoss(DistillLoss):
    """Shared plumbing: pick logits, temperature-scale, reduce over real positions and samples."""

    def __init__(self, modality: str = "image", temperature: float = 4.0):
        super().__init__()
        self.modality = modality
        self.temperature = temperature

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        raise NotImplementedError

    def needs(self) -> list[Need]:
        return [Need("student", self.modality, "logits"), Need("teacher", self.modality, "logits")]

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        fs = self.pick_field(student, self.modality, "student", "logits")
        ft = self.pick_field(teacher, self.modality, "teacher", "logits")
        if fs.logits.shape != ft.logits.shape:
            raise ConfigError(
                f"loss '{self.name}': student logits {list(fs.logits.shape)} and teacher logits "
                f"{list(ft.logits.shape)} differ in shape"
            )
        t = self.temperature
        log_p_s = torch.log_softmax(fs.logits.float() / t, dim=-1)
        log_p_t = torch.log_softmax(ft.logits.detach().float() / t, dim=-1)
        div = self.divergence(log_p_t, log_p_s) * t * t
        if div.dim() == 2:  # per-step logits: average over real steps of each sample
            mask = fs.mask if fs.mask is not None and fs.mask.shape == div.shape else None
            if mask is None:
                div = div.mean(dim=1)
            else:
                m = mask.to(div.dtype)
                div = (div * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return LossOutput(sample_weighted_mean(div, batch))


@register_loss("hinton")
class HintonKD(_LogitLoss):
    """T²·KL(p_T^T ‖ p_S^T) (Hinton et al., 2015)."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return _kl(log_p_t, log_p_s)


@register_loss("reverse_kl")
class ReverseKL(_LogitLoss):
    """T²·KL(p_S^T ‖ p_T^T): mode-seeking."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return _kl(log_p_s, log_p_t)


@register_loss("js")
class JensenShannon(_LogitLoss):
    """T²·½[KL(p_T‖m) + KL(p_S‖m)], m = ½(p_T + p_S)."""

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        log_m = torch.logsumexp(torch.stack([log_p_t, log_p_s]), dim=0) - math.log(2.0)
        return 0.5 * (_kl(log_p_t, log_m) + _kl(log_p_s, log_m))

"""CLIP contrastive loss and TinyCLIP affinity mimicking over (globally gathered) image-text batches."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.distributed import gather_no_grad, gather_with_grad
from xmodal.errors import ConfigError
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss, soft_cross_entropy

DEFAULT_SCALE = 1 / 0.07  # CLIP's initial inverse temperature
MAX_SCALE = 100.0  # open_clip clamps the learned logit scale here


class LogitScale(nn.Module):
    """τ stored as ln τ; learnable or fixed, clamped to `max_scale` like open_clip."""

    def __init__(self, init: float, learn: bool, max_scale: float = MAX_SCALE):
        super().__init__()
        value = torch.tensor(math.log(init), dtype=torch.float32)
        if learn:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


def pair_embeddings(loss: DistillLoss, outputs: Outputs, a: str, b: str, role: str, grad: bool):
    """Normalised, globally gathered pooled embeddings of modalities a and b."""
    gather = gather_with_grad if grad else gather_no_grad
    za = F.normalize(loss.pick(outputs, a, role).pooled.float(), dim=-1)
    zb = F.normalize(loss.pick(outputs, b, role).pooled.float(), dim=-1)
    return gather(za), gather(zb)


@register_loss("clip")
class ClipLoss(DistillLoss):
    """Symmetric InfoNCE: ½[CE(τ·a·bᵀ, diag) + CE(τ·b·aᵀ, diag)] on the student's own (native) outputs.

    τ is the student's own logit scale when its Features carry one (open_clip models do: it trains with the
    model and export ships it), clamped at 100 like open_clip; `learn_scale: false` keeps it fixed. A student
    without one uses the loss's own τ, initialised at `scale` (1/0.07 by default).
    """

    def __init__(self, a: str = "image", b: str = "text", scale: float | None = None, learn_scale: bool = True):
        super().__init__()
        self.a, self.b = a, b
        self.explicit_scale = scale is not None
        self.learn_scale = learn_scale
        self.scale = LogitScale(DEFAULT_SCALE if scale is None else scale, learn_scale)

    def needs(self) -> list[Need]:
        return [Need("student", self.a), Need("student", self.b)]

    def tau(self, student: Outputs) -> Tensor:
        """The inverse temperature to use: the student's own when it has one, else the loss's."""
        own = self.pick(student, self.a, "student").logit_scale
        if own is None:
            return self.scale()
        if self.explicit_scale:
            raise ConfigError(
                f"loss '{self.name}': 'scale' gives the loss a temperature of its own, but the student has its own "
                "logit_scale (trained with it and exported with it); drop 'scale' (an open_clip model_cfg sets the "
                "start value with 'init_logit_scale'), and add learn_scale: false to keep it fixed"
            )
        own = own.float().reshape(())
        return (own if self.learn_scale else own.detach()).clamp(max=MAX_SCALE)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        za, zb = pair_embeddings(self, student, self.a, self.b, "student", grad=True)
        tau = self.tau(student)
        logits = tau * za @ zb.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        l_ab = F.cross_entropy(logits, labels)
        l_ba = F.cross_entropy(logits.t(), labels)
        return LossOutput(0.5 * (l_ab + l_ba), {"a2b": l_ab, "b2a": l_ba, "scale": tau.detach()})


@register_loss("affinity")
class AffinityMimickingLoss(DistillLoss):
    """TinyCLIP affinity mimicking: the student's image↔text affinities match the teacher's (soft CE).

    Compares similarity matrices, so each model's native features are used whatever their widths.

    `A = τ·norm(s_a)·norm(s_b)ᵀ`, teacher `Â` with its own features and scale;
    `L = ½[CE(A, softmax(Â)) + CE(Aᵀ, softmax(Âᵀ))]`. Widths of teacher and student may differ.
    """

    def __init__(
        self,
        a: str = "image",
        b: str = "text",
        scale: float = 50.0,
        teacher_scale: float | None = None,
        learn_scale: bool = False,
    ):
        super().__init__()
        self.a, self.b = a, b
        self.scale = LogitScale(scale, learn_scale)
        self.register_buffer("teacher_scale", torch.tensor(float(teacher_scale or scale)))

    def needs(self) -> list[Need]:
        return [Need(role, m) for role in ("student", "teacher") for m in (self.a, self.b)]

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        sa, sb = pair_embeddings(self, student, self.a, self.b, "student", grad=True)
        with torch.no_grad():
            ta, tb = pair_embeddings(self, teacher, self.a, self.b, "teacher", grad=False)
            t_ab = self.teacher_scale * ta @ tb.t()
        s_ab = self.scale() * sa @ sb.t()
        l_ab = soft_cross_entropy(s_ab, t_ab.softmax(dim=-1)).mean()
        l_ba = soft_cross_entropy(s_ab.t(), t_ab.t().softmax(dim=-1)).mean()
        return LossOutput(0.5 * (l_ab + l_ba), {"a2b": l_ab, "b2a": l_ba})

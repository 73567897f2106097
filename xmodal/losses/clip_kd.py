"""CLIP-KD losses: feature distillation (FD) and interactive contrastive learning (ICL) on projected features.

The projector P of the paper is the student's projection into the alignment space: both losses compare the
student's projected view `P·s` with the teacher's features (`view = "projected"`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from xmodal.features import PROJECTED
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss
from xmodal.losses.contrastive import LogitScale, pair_embeddings
from xmodal.losses.feature import FeatureMSE


@register_loss("fd")
class FeatureDistillation(FeatureMSE):
    """FD = Σ_m MSE(norm(P s_m), norm(t_m)) over image and text (per-element mean, batch mean)."""

    def __init__(self, modalities: Sequence[str] = ("image", "text")):
        super().__init__(modalities=modalities, level="pooled", normalize=True)


@register_loss("icl")
class InteractiveContrastiveLoss(DistillLoss):
    """ICL = ½[CE(τ_c·norm(s_a)·norm(t_b)ᵀ, diag) + CE(τ_c·norm(s_b)·norm(t_a)ᵀ, diag)].

    Student queries contrast against teacher keys of the other modality; τ_c is learnable by default.
    Features are gathered over ranks (student with gradient, teacher without).
    """

    view = PROJECTED

    def __init__(self, a: str = "image", b: str = "text", scale: float = 1 / 0.07, learn_scale: bool = True):
        super().__init__()
        self.a, self.b = a, b
        self.scale = LogitScale(scale, learn_scale)

    def needs(self) -> list[Need]:
        return [Need(role, m) for role in ("student", "teacher") for m in (self.a, self.b)]

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        sa, sb = pair_embeddings(self, student, self.a, self.b, "student", grad=True)
        with torch.no_grad():
            ta, tb = pair_embeddings(self, teacher, self.a, self.b, "teacher", grad=False)
        if sa.shape[0] != ta.shape[0] or sa.shape[-1] != ta.shape[-1]:
            raise ValueError(
                f"loss 'icl': student {list(sa.shape)} vs teacher {list(ta.shape)} features; both must hold the same "
                "samples in the same alignment-space width"
            )
        tau = self.scale()
        labels = torch.arange(sa.shape[0], device=sa.device)
        l_ab = F.cross_entropy(tau * sa @ tb.t(), labels)
        l_ba = F.cross_entropy(tau * sb @ ta.t(), labels)
        return LossOutput(0.5 * (l_ab + l_ba), {"a2b": l_ab, "b2a": l_ba, "scale": tau.detach()})

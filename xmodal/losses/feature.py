"""Feature distillation on projected features: MSE (CLIP-KD FD when normalised) and cosine distance.

Student and teacher features are compared element by element, so these losses see the student's projected
view (into the teacher's width).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.features import PROJECTED, Features
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss, sample_weighted_mean


class _FeatureLoss(DistillLoss):
    """Sum over modalities of a per-sample distance between projected student and teacher features."""

    view = PROJECTED

    def __init__(
        self,
        modalities: Sequence[str] = ("image", "text"),
        level: Literal["pooled", "tokens"] = "pooled",
        normalize: bool = False,
    ):
        super().__init__()
        if level not in ("pooled", "tokens"):
            raise ValueError(f"level must be 'pooled' or 'tokens', got '{level}'")
        self.modalities = list(modalities)
        self.level = level
        self.normalize = normalize

    def needs(self) -> list[Need]:
        return [Need(role, m, self.level) for role in ("student", "teacher") for m in self.modalities]

    def distance(self, s: Tensor, t: Tensor) -> Tensor:
        """Per-vector distance over the last dim."""
        raise NotImplementedError

    def per_sample(self, fs: Features, ft: Features, modality: str) -> Tensor:
        if self.level == "pooled":
            s, t = fs.pooled.float(), ft.pooled.detach().float()
        else:
            if fs.tokens is None or ft.tokens is None:
                raise ConfigError(
                    f"loss '{self.name}' with level=tokens needs token features for '{modality}' from both models, "
                    f"but the student's hold {fs.describe()} and the teacher's {ft.describe()}"
                )
            s, t = fs.tokens.float(), ft.tokens.detach().float()
        if s.shape != t.shape:
            raise ValueError(
                f"loss '{self.name}' on '{modality}': student {list(s.shape)} vs teacher {list(t.shape)}; "
                "project both into the alignment space (same width) and, for tokens, align lengths first"
            )
        if self.normalize:
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        d = self.distance(s, t)
        if self.level == "tokens":
            m = (fs.mask & ft.mask).to(d.dtype)
            d = (d * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return d

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        parts = {}
        for modality in self.modalities:
            fs = self.pick(student, modality, "student")
            ft = self.pick(teacher, modality, "teacher")
            parts[modality] = sample_weighted_mean(self.per_sample(fs, ft, modality), batch)
        total = torch.stack(list(parts.values())).sum()
        return LossOutput(total, parts)


@register_loss("feature_mse")
class FeatureMSE(_FeatureLoss):
    """Mean squared error per element; with normalize=True this is CLIP-KD's FD on aligned features."""

    def distance(self, s: Tensor, t: Tensor) -> Tensor:
        return (s - t).pow(2).mean(dim=-1)


@register_loss("feature_cosine")
class FeatureCosine(_FeatureLoss):
    """1 − cos(s, t) per vector."""

    def distance(self, s: Tensor, t: Tensor) -> Tensor:
        return 1.0 - F.cosine_similarity(s, t, dim=-1)

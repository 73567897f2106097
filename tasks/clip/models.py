"""CLIP teacher and student as the engine sees them.

The student's native features are its open_clip embeddings (`encode_image` / `encode_text`): what evaluation
uses, what export ships and what same-space losses (clip, affinity, dcd) train. When its width differs from the
teacher's (or a projection is configured), each Features also carries a projected view into the teacher's width,
used only by the losses that compare against teacher features directly (fd, icl, feature_mse, feature_cosine).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from xmodal.adapters import ImageAdapter, TextAdapter, clip_embed_dim
from xmodal.alignment import AlignmentSpace
from xmodal.config import LossSpec
from xmodal.features import Features
from xmodal.fingerprint import model_fingerprint

log = logging.getLogger(__name__)

# What the CLIP adapters fill: pooled embeddings of each modality, no tokens and no class logits.
CLIP_PRODUCES: dict[str, tuple[str, ...]] = {"image": ("pooled",), "text": ("pooled",)}
CLIP_LOSS_HINT = ("CLIP image and text adapters give embeddings, not class logits or tokens; use clip, affinity, "
                  "fd, icl, dcd, feature_mse or feature_cosine")


class ClipStudent(nn.Module):
    """An open_clip model (native features) with projections into the teacher's space of width `dim`.

    The state dict holds `clip.*` (the open_clip model, exportable as is) and `space.*` (projections, used only by
    teacher-comparing losses and not exported). The model's `logit_scale` travels with its Features, so the
    contrastive loss trains the temperature export ships.
    """

    produces = CLIP_PRODUCES

    def __init__(self, clip: nn.Module, dim: int | None = None, projection: str | None = None,
                 image_key: str = "image", text_key: str = "text"):
        super().__init__()
        self.clip = clip
        self.space = AlignmentSpace(dim or clip_embed_dim(clip))
        self.space.attach("student", ImageAdapter(clip, batch_key=image_key), kind=projection)
        self.space.attach("student", TextAdapter(clip, batch_key=text_key), kind=projection)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        out = self.space.encode("student", batch)
        scale = getattr(self.clip, "logit_scale", None)
        if isinstance(scale, Tensor):
            tau = scale.exp()
            out = {m: f.replace(logit_scale=tau) for m, f in out.items()}
        return out


class ClipTeacher(nn.Module):
    """A frozen open_clip model: batch → {"image", "text"} Features in its own embedding space.

    An nn.Module so the engine moves it to each process's device; its adapters are views over `clip`, not
    submodules, so the model's weights appear once. It is frozen here, and the engine keeps it out of the optimizer.
    """

    produces = CLIP_PRODUCES

    def __init__(self, clip: nn.Module, image_key: str = "image", text_key: str = "text", extra: Any = None):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self._adapters = (ImageAdapter(clip, frozen=True, batch_key=image_key),
                          TextAdapter(clip, frozen=True, batch_key=text_key))
        self.dim = self._adapters[0].width
        self.fingerprint = model_fingerprint(clip, extra)

    def train(self, mode: bool = True) -> ClipTeacher:
        super().train(mode)
        self.clip.eval()  # a teacher never leaves eval mode (dropout, norms)
        return self

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        return {a.modality: a(batch) for a in self._adapters}


def check_losses(losses: Sequence[LossSpec | Mapping] | Any, *, teacher: bool = True) -> None:
    """Refuse, before any model is loaded, configured losses that need what CLIP models do not produce
    (e.g. `hinton` needs class logits) or a teacher the run does not have."""
    from xmodal.losses import LossSet, build_losses

    loss_set = losses if isinstance(losses, LossSet) else build_losses(losses)
    loss_set.check_inputs(CLIP_PRODUCES, CLIP_PRODUCES if teacher else None, hint=CLIP_LOSS_HINT)

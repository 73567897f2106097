"""CLIP teacher and student as the engine sees them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from xmodal.adapters import ImageAdapter, TextAdapter, clip_embed_dim
from xmodal.alignment import AlignmentSpace
from xmodal.features import Features
from xmodal.fingerprint import model_fingerprint

log = logging.getLogger(__name__)


class ClipStudent(nn.Module):
    """An open_clip model whose image/text embeddings are projected into the teacher's space (`dim`).

    The state dict holds `clip.*` (the open_clip model, exportable as is) and `space.*` (projections).
    """

    def __init__(self, clip: nn.Module, dim: int | None = None, projection: str | None = None,
                 image_key: str = "image", text_key: str = "text"):
        super().__init__()
        self.clip = clip
        self.space = AlignmentSpace(dim or clip_embed_dim(clip))
        self.space.attach("student", ImageAdapter(clip, batch_key=image_key), kind=projection)
        self.space.attach("student", TextAdapter(clip, batch_key=text_key), kind=projection)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        return self.space.encode("student", batch)


class ClipTeacher:
    """A frozen open_clip model as a callable batch → {"image", "text"} Features in its own embedding space."""

    def __init__(self, clip: nn.Module, image_key: str = "image", text_key: str = "text", extra: Any = None):
        self.clip = clip.eval().requires_grad_(False)
        self.image = ImageAdapter(clip, frozen=True, batch_key=image_key)
        self.text = TextAdapter(clip, frozen=True, batch_key=text_key)
        self.dim = self.image.width
        self.fingerprint = model_fingerprint(clip, extra)

    def to(self, device: torch.device) -> ClipTeacher:
        self.clip.to(device)
        return self

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        return {"image": self.image(batch), "text": self.text(batch)}

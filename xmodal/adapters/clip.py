"""Image and text adapters over open_clip models (CLIP, CustomTextCLIP and their towers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from xmodal.adapters.base import ADAPTERS, ModalityAdapter
from xmodal.features import Features


def clip_embed_dim(model: nn.Module) -> int:
    """Output width of an open_clip model's joint embedding."""
    if getattr(model, "text_projection", None) is not None:
        proj = model.text_projection
        return proj.shape[1] if hasattr(proj, "shape") else proj.out_features
    visual = model.visual
    if getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    proj = getattr(visual, "proj", None)
    if proj is not None:
        return proj.shape[1]
    raise ValueError(f"cannot infer the embedding width of {type(model).__name__}; pass width= explicitly")


@ADAPTERS.register("image")
class ImageAdapter(ModalityAdapter):
    """batch['image'] float [B, 3, H, W] → pooled image embedding of an open_clip model."""

    modality = "image"

    def __init__(
        self, model: nn.Module, width: int | None = None, *, frozen: bool = False, batch_key: str | None = None
    ):
        super().__init__(model, width or clip_embed_dim(model), frozen=frozen, batch_key=batch_key)

    def encode(self, batch: Mapping[str, Any]) -> Features:
        return Features(pooled=self.encoder.encode_image(self.inputs(batch)))


@ADAPTERS.register("text")
class TextAdapter(ModalityAdapter):
    """batch['text'] long token ids [B, L] → pooled text embedding of an open_clip model."""

    modality = "text"

    def __init__(
        self, model: nn.Module, width: int | None = None, *, frozen: bool = False, batch_key: str | None = None
    ):
        super().__init__(model, width or clip_embed_dim(model), frozen=frozen, batch_key=batch_key)

    def encode(self, batch: Mapping[str, Any]) -> Features:
        return Features(pooled=self.encoder.encode_text(self.inputs(batch)))

"""Modality adapters: wrap an encoder, turn a raw batch into Features, own the projection to the shared space."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from xmodal.errors import DataError
from xmodal.features import Features
from xmodal.registry import Registry

MODALITIES = ("image", "text", "audio", "video", "bev")

ADAPTERS: Registry[type[ModalityAdapter]] = Registry("adapter")


class ModalityAdapter(nn.Module):
    """Base adapter: `encode` gives native-width Features; `forward` gives them carrying their projected view.

    The native features are what the model is evaluated on and exported as; the projected view (into the
    alignment space, attached only when the projection is not the identity) is for losses that compare
    against the teacher's features directly.

    `frozen=True` marks a teacher: eval mode, no gradients, and encoding under torch.inference_mode().
    `batch_key` reads another batch entry (e.g. "teacher_image" when teacher and student preprocess differently).
    """

    modality: ClassVar[str] = ""
    batch_key: ClassVar[str] = ""

    def __init__(self, encoder: nn.Module, width: int, *, frozen: bool = False, batch_key: str | None = None):
        super().__init__()
        if batch_key:
            self.batch_key = batch_key
        self.encoder = encoder
        self.width = int(width)
        self.frozen = frozen
        self.projection: nn.Module = nn.Identity()
        if frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> ModalityAdapter:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def inputs(self, batch: Mapping[str, Any]) -> Tensor:
        """The tensor this adapter reads from the batch, with an error naming the missing key."""
        key = self.batch_key or self.modality
        if key not in batch:
            raise DataError(
                f"{type(self).__name__} reads batch['{key}'] but the batch has keys: {', '.join(batch) or 'none'}"
            )
        return batch[key]

    def encode(self, batch: Mapping[str, Any]) -> Features:
        """Native-width Features for the batch."""
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Any]) -> Features:
        if self.frozen:
            import torch

            with torch.inference_mode():
                feats = self.encode(batch)
            feats = feats.map(lambda t: t.clone())  # leave inference mode: usable as loss targets
        else:
            feats = self.encode(batch)
        return with_projection(self.projection, feats)


def project_features(projection: nn.Module, feats: Features) -> Features:
    """Apply a projection to pooled and to same-width tokens; mask and logits pass through."""
    if isinstance(projection, nn.Identity):
        return feats.view("native")
    tokens = feats.tokens
    if tokens is not None and tokens.shape[-1] == feats.pooled.shape[-1]:
        tokens = projection(tokens)
    return Features(pooled=projection(feats.pooled), tokens=tokens, mask=feats.mask, logits=feats.logits)


def with_projection(projection: nn.Module, feats: Features) -> Features:
    """Native `feats` carrying their projected view (none for an identity projection: both views coincide)."""
    if isinstance(projection, nn.Identity):
        return feats
    return feats.replace(projected=project_features(projection, feats))

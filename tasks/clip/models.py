"""CLIP teacher and student as the engine sees them, and the paired-view data set feeding both."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass
class View:
    """One model's input pipeline: image transform and tokenizer, written to batch[image_key]/[text_key]."""

    transform: Callable
    tokenizer: Callable
    image_key: str = "image"
    text_key: str = "text"


def same_pipeline(a: Any, b: Any) -> bool:
    """True when two transforms/tokenizers would produce identical inputs (same repr and context length)."""
    return repr(a) == repr(b) and getattr(a, "context_length", None) == getattr(b, "context_length", None)


class PairedViews(torch.utils.data.Dataset):
    """Wraps an ImageTextDataset (PIL images, caption strings) and applies each model's own pipeline.

    Items: {"id", image/text entries per view}; None for a skipped (unreadable) image.
    """

    def __init__(self, base: torch.utils.data.Dataset, views: Sequence[View]):
        self.base = base
        self.views = list(views)

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = self.base[i]
        if item is None:
            return None
        out: dict[str, Any] = {"id": str(item["index"])}
        for v in self.views:
            out[v.image_key] = v.transform(item["image"])
            out[v.text_key] = v.tokenizer([item["text"]])[0]
        return out


def collate_skipping(samples: Sequence[dict | None]) -> dict[str, Any]:
    """Collate dict samples, dropping the ones that were skipped (None) because their image was unreadable."""
    from xmodal.engine import collate_samples

    kept = [s for s in samples if s is not None]
    if not kept:
        from xmodal.errors import DataError

        raise DataError("every image in a batch was unreadable; check the data set (on_error: raise shows why)")
    return collate_samples(kept)

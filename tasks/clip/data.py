"""The CLIP job's training data: each model's own input pipeline (View) over one image-caption data set."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


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

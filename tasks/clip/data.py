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

    Items: {"id": the base's stable sample key, image/text entries per view}; None for a skipped (unreadable)
    image. Each view's image transform runs with the global RNGs seeded from (seed, sample key, epoch), so random
    crops depend on the sample and the epoch only (not on the worker), and views with the same random transform
    see the same crop. `seed` defaults to the base data set's.
    """

    def __init__(self, base: torch.utils.data.Dataset, views: Sequence[View], seed: int | None = None):
        self.base = base
        self.views = list(views)
        self.seed = int(getattr(base, "seed", 0) if seed is None else seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def sample_key(self, index: int) -> str:
        from xmodal.engine.data import sample_key

        return sample_key(self.base, index)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        from xmodal.engine.data import sample_seed, seeded_rngs

        item = self.base[i]
        if item is None:
            return None
        key = str(item["id"])
        seed = sample_seed(self.seed, key, self.epoch)
        out: dict[str, Any] = {"id": key}
        for v in self.views:
            with seeded_rngs(seed):
                out[v.image_key] = v.transform(item["image"])
            out[v.text_key] = v.tokenizer([item["text"]])[0]
        return out


def collate_skipping(samples: Sequence[dict | None]) -> dict[str, Any]:
    """Collate dict samples, dropping skipped (None) ones: for loaders outside the engine (e.g. `xmodal cache`);
    the engine replaces a skipped sample before collation, so its batches keep their size."""
    from xmodal.engine import collate_samples

    kept = [s for s in samples if s is not None]
    if not kept:
        from xmodal.errors import DataError

        raise DataError("every image in a batch was unreadable; check the data set (on_error: raise shows why)")
    return collate_samples(kept)

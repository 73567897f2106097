"""The CLIP job's training data: each model's own input pipeline (View) over one image-caption data set.

Shared augmented views (the augmentation-aware teacher cache, as in MobileCLIP's reinforced data sets): a view is
a crop box and a horizontal flip in the original image's pixels (`VIEW_PARAMS`), drawn by a `ViewRecipe` and
rendered by each model's own `ViewRenderer` (its size, interpolation, mean and std). `RecordedViews` gives
`xmodal cache` K views per image with their parameters; in training `PairedViews.share_views` replays one stored
view per (seed, key, epoch), re-rendered from the original image with the stored parameters, so the student sees
the very crop and flip the cached teacher embedding was computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

VIEW_PARAMS = ("top", "left", "height", "width", "flip")  # crop box in original pixels, then flip (0 or 1)


@dataclass
class View:
    """One model's input pipeline: image transform and tokenizer, written to batch[image_key]/[text_key]."""

    transform: Callable
    tokenizer: Callable
    image_key: str = "image"
    text_key: str = "text"
    render: Callable | None = None  # (image, view parameters) -> tensor: this model's pipeline for a shared view


@dataclass(frozen=True)
class ViewRecipe:
    """How augmented views are drawn: a RandomResizedCrop box (area `scale`, aspect `ratio`) and a horizontal flip
    with probability `flip`; `count` views per image in a cache. Parameters depend only on (seed, key, draw)."""

    count: int = 4
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        from xmodal.errors import ConfigError

        if self.count < 1:
            raise ConfigError(f"teacher.cache_views.count must be at least 1 (views per image), got {self.count}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"teacher.cache_views: scale {self.scale} needs 0 < low <= high <= 1 and ratio "
                              f"{self.ratio} 0 < low <= high")
        if not 0 <= self.flip <= 1:
            raise ConfigError(f"teacher.cache_views.flip is a probability, got {self.flip}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as the cache plan records it (so a resumed build cannot mix recipes)."""
        return {"count": self.count, "params": list(VIEW_PARAMS), "kind": "resized_crop+hflip",
                "scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip, "seed": self.seed}

    def draw(self, key: str, draw: int, width: int, height: int, seed: int | None = None) -> np.ndarray:
        """Parameters of draw `draw` (a cached view's index, or an epoch) of sample `key` in a `width`×`height`
        image: a pure function of (seed, key, draw); `seed` defaults to the recipe's."""
        from torchvision.transforms import RandomResizedCrop

        from xmodal.engine.data import sample_seed

        g = torch.Generator().manual_seed(sample_seed(self.seed if seed is None else seed, key, draw))
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            top, left, h, w = RandomResizedCrop.get_params(
                torch.empty(1, 1, 1).expand(1, height, width), list(self.scale), list(self.ratio))  # size only
        flip = float(torch.rand((), generator=g) < self.flip)
        return np.array([top, left, h, w, flip], dtype=np.float32)


def _image_size(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or a [C, H, W] tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


class ViewRenderer:
    """One model's pipeline for a given view: crop box resized to the model's size (its interpolation, antialiased,
    as RandomResizedCrop does), the flip, then RGB, tensor and the model's normalisation. With flip 0 this is
    exactly open_clip's train transform for the same box."""

    def __init__(self, preprocess_cfg: Mapping[str, Any]):
        from torchvision.transforms import InterpolationMode

        size = preprocess_cfg.get("size", 224)
        self.size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
        self.interpolation = InterpolationMode(preprocess_cfg.get("interpolation", "bicubic"))
        self.mode = preprocess_cfg.get("mode", "RGB")
        self.mean = list(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = list(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    def __call__(self, image: Any, params: Sequence[float]) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        top, left, h, w, flip = (int(round(float(v))) for v in params)
        out = TF.resized_crop(image, top, left, h, w, self.size, self.interpolation, antialias=True)
        if flip:
            out = TF.hflip(out)
        if not isinstance(out, torch.Tensor):
            if out.mode != self.mode:
                out = out.convert(self.mode)
            out = TF.to_tensor(out)
        return TF.normalize(out, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"ViewRenderer(size={self.size}, interpolation={self.interpolation.value}, mode={self.mode}, "
                f"mean={self.mean}, std={self.std})")


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
        self.recipe: ViewRecipe | None = None
        self.replay: Any = None  # a TeacherCache whose recorded views are replayed

    def share_views(self, recipe: ViewRecipe | None = None, cache: Any = None) -> PairedViews:
        """Give every view the same crop and flip: replayed from `cache` (one of its recorded views, chosen per
        (seed, key, epoch)) when it records views, else drawn online from `recipe` per (seed, key, epoch)."""
        from xmodal.errors import ConfigError

        recorded = getattr(cache, "views", None)
        if cache is not None and recorded is None:
            if recipe is not None:
                raise ConfigError(f"teacher.cache_views is set, but teacher cache {cache.path} records no augmented "
                                  "views (it was built without them); rebuild it with `xmodal cache CONFIG`")
            return self
        if recorded is not None and recipe is not None and int(recorded["count"]) != recipe.count:
            raise ConfigError(f"teacher.cache_views.count is {recipe.count}, but teacher cache {cache.path} records "
                              f"{recorded['count']} views per image; set it to {recorded['count']} or rebuild the "
                              "cache with `xmodal cache CONFIG`")
        if recorded is None and recipe is None:
            return self
        missing = [v.image_key for v in self.views if v.render is None]
        if missing:
            raise ConfigError(f"shared augmented views need each model's renderer; views {missing} have none")
        self.recipe, self.replay = recipe, cache if recorded is not None else None
        return self

    def replayed_view(self, key: str) -> int:
        """The recorded view (of the cache's K) that sample `key` shows in this epoch."""
        from xmodal.engine.data import sample_seed

        return sample_seed(self.seed, key, self.epoch) % int(self.replay.views["count"])

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
        if self.replay is not None or self.recipe is not None:
            if self.replay is not None:  # the stored parameters of one recorded view
                view = self.replayed_view(key)
                params = self.replay.view_params([key], [view])[0]
                out["aug_index"] = view
            else:  # a fresh view per epoch, the same for every model
                params = self.recipe.draw(key, self.epoch, *_image_size(item["image"]), seed=self.seed)
            out["view_params"] = torch.from_numpy(params)
            for v in self.views:
                out[v.image_key] = v.render(item["image"], params)
                out[v.text_key] = v.tokenizer([item["text"]])[0]
            return out
        for v in self.views:
            with seeded_rngs(seed):
                out[v.image_key] = v.transform(item["image"])
            out[v.text_key] = v.tokenizer([item["text"]])[0]
        return out


class RecordedViews(torch.utils.data.Dataset):
    """`count` augmented views of every image for `xmodal cache`: item j is view j % count of image j // count,
    rendered by the teacher's `view` from parameters drawn by `recipe`, with `aug_index` and `view_params`."""

    def __init__(self, base: torch.utils.data.Dataset, view: View, recipe: ViewRecipe):
        from xmodal.errors import ConfigError

        if view.render is None:
            raise ConfigError("RecordedViews needs the teacher's ViewRenderer (View.render)")
        self.base, self.view, self.recipe = base, view, recipe
        self._last: tuple[int, Any] | None = None  # views of one image are adjacent: load it once

    def __len__(self) -> int:
        return len(self.base) * self.recipe.count

    def sample_key(self, index: int) -> str:
        from xmodal.engine.data import sample_key

        return sample_key(self.base, index // self.recipe.count)

    def __getitem__(self, j: int) -> dict[str, Any] | None:
        i, view = divmod(int(j), self.recipe.count)
        if self._last is None or self._last[0] != i:
            self._last = (i, self.base[i])
        item = self._last[1]
        if item is None:
            return None
        key = str(item["id"])
        params = self.recipe.draw(key, view, *_image_size(item["image"]))
        return {"id": key, "aug_index": view, "view_params": torch.from_numpy(params),
                self.view.image_key: self.view.render(item["image"], params),
                self.view.text_key: self.view.tokenizer([item["text"]])[0]}


def collate_skipping(samples: Sequence[dict | None]) -> dict[str, Any]:
    """Collate dict samples, dropping skipped (None) ones: for loaders outside the engine (e.g. `xmodal cache`);
    the engine replaces a skipped sample before collation, so its batches keep their size."""
    from xmodal.engine import collate_samples

    kept = [s for s in samples if s is not None]
    if not kept:
        from xmodal.errors import DataError

        raise DataError("every image in a batch was unreadable; check the data set (on_error: raise shows why)")
    return collate_samples(kept)

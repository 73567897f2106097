"""Images for prompt distillation: an unlabelled image folder or a labelled task file, with stable sample keys,
the data contract's per-(seed, key, epoch) augmentation, and an up-front readability check.

A sample's key is its path relative to the folder (or task file) it is listed in, so a cache and the held-out
validation split stay with their images when the data moves.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xmodal.data.images import open_rgb
from xmodal.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageItem:
    """One image: its absolute path, its stable key and its class index (None: unlabelled)."""

    path: str
    key: str
    label: int | None = None


def list_image_folder(folder: str | os.PathLike) -> list[ImageItem]:
    """Every image file under `folder` (recursively, sorted), unlabelled."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return [ImageItem(str(p.resolve()), p.relative_to(root).as_posix()) for p in paths]


def read_task_items(path: str | os.PathLike) -> tuple[list[str], list[ImageItem]]:
    """(class names, labelled items) of a task file in the zeroshot.json format."""
    from xmodal.tasks.zeroshot import read_zeroshot_file

    task = read_zeroshot_file(path)
    root = Path(task.source).parent
    items = []
    for file, label in task.images:
        p = Path(file)
        try:
            key = p.relative_to(root).as_posix()
        except ValueError:
            key = p.as_posix()
        items.append(ImageItem(str(p.resolve()), key, int(label)))
    return task.classnames, items


def read_images(path: str | os.PathLike) -> tuple[list[str] | None, list[ImageItem]]:
    """An image folder (no class names, unlabelled items) or a task file (its class names, labelled items)."""
    p = Path(path)
    if p.is_dir() and not (p / "zeroshot.json").is_file():
        return None, list_image_folder(p)
    if not p.exists():
        raise DataError(f"{p}: not found (give an image folder or a task JSON with classnames and images)")
    return read_task_items(p)


def held_out(key: str, fraction: float, seed: int = 0) -> bool:
    """True for the keys a validation split of `fraction` holds: a pure function of (seed, key)."""
    digest = hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def split_items(items: Sequence[ImageItem], fraction: float, seed: int = 0) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train, val) by key; both non-empty when `fraction` > 0 and there are two items or more."""
    if fraction <= 0:
        return list(items), []
    val = [it for it in items if held_out(it.key, fraction, seed)]
    train = [it for it in items if not held_out(it.key, fraction, seed)]
    if not val and len(items) > 1:  # tiny data sets: hold out the item closest to the line
        val, train = [train[-1]], train[:-1]
    if not train:
        raise DataError(f"val_fraction {fraction} leaves no training images out of {len(items)}")
    return train, val


def _image_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def unreadable_images(items: Sequence[ImageItem], workers: int | None = None) -> list[tuple[ImageItem, str]]:
    """The items whose image cannot be opened and decoded, with why (decoded in a few threads)."""
    errors = _image_errors()

    def check(item: ImageItem) -> str | None:
        try:
            open_rgb(item.path)
        except errors as e:
            return f"{type(e).__name__}: {e}"
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, items))
    return [(it, why) for it, why in zip(items, results) if why is not None]


def check_readable(items: Sequence[ImageItem], what: str) -> None:
    """Refuse, before anything is written, a set of images with unreadable files, listing them."""
    bad = unreadable_images(items)
    if bad:
        shown = "; ".join(f"{it.path} ({why})" for it, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{what}: {len(bad)} of {len(items)} image(s) cannot be read: {shown}{more}. Remove or "
                        "replace them, or set data.on_error: skip to train without them")


class PromptImages(torch.utils.data.Dataset):
    """Items {"id", <view key>: image tensor, ..., "label" (when `labels`)}; None for an unreadable image when
    `on_error` is "skip". Each view's transform runs under RNGs seeded from (seed, key, epoch) (the engine's data
    contract), so its augmentation depends on nothing else."""

    def __init__(self, items: Sequence[ImageItem], views: Sequence[tuple[str, Callable]], *, seed: int = 0,
                 labels: bool = False, on_error: str = "raise", source: str = ""):
        if not items:
            raise DataError(f"{source or 'image data'}: no images")
        if labels and any(it.label is None for it in items):
            raise DataError(f"{source}: labels are needed, but these images have none (an image folder); use a "
                            "task file with labels")
        self.items = list(items)
        self.views = list(views)
        self.seed, self.epoch = int(seed), 0
        self.labels, self.on_error, self.source = labels, on_error, source

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_key(self, index: int) -> str:
        return self.items[index].key

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        from xmodal.engine.data import sample_seed, seeded_rngs

        item = self.items[index]
        try:
            image = open_rgb(item.path)  # a file or a tar shard's member (`--data wds:PATH`)
        except _image_errors() as e:
            if self.on_error == "skip":
                return None
            raise DataError(f"{self.source}: image {item.path} cannot be read ({type(e).__name__}: {e})") from e
        seed = sample_seed(self.seed, item.key, self.epoch)
        out: dict[str, Any] = {"id": item.key}
        for key, transform in self.views:
            with seeded_rngs(seed):
                out[key] = transform(image)
        if self.labels:
            out["label"] = int(item.label)
        return out


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "PromptImages",
    "check_readable",
    "held_out",
    "list_image_folder",
    "read_images",
    "read_task_items",
    "split_items",
    "unreadable_images",
]

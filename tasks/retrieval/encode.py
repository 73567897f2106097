"""Encode an image-text data set with a CLIP-style model in batches, through the embedding cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodal.data.eval_sets import RetrievalSet
from xmodal.errors import DataError

from .store import EmbeddingStore, cache_key

log = logging.getLogger(__name__)


@dataclass
class ImageTextEmbeddings:
    """L2-normalised fp16 embeddings of every image [I, D] and caption [T, D], and each caption's image."""

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    image_paths: list[str]
    from_cache: bool = False


def flatten_records(records: Sequence) -> tuple[list[str], list[str], np.ndarray]:
    """Image paths, all captions in order, and the image index of every caption."""
    if not records:
        raise DataError("the image-text data set is empty: it has no images to evaluate")
    paths, captions, owner = [], [], []
    for i, rec in enumerate(records):
        if not rec.captions:
            raise DataError(f"{_where(rec)}: image {rec.image} has no captions")
        paths.append(rec.image)
        captions.extend(rec.captions)
        owner.extend([i] * len(rec.captions))
    return paths, captions, np.asarray(owner, dtype=np.int64)


def _where(rec) -> str:
    where = getattr(rec, "where", "")
    return where or f"image {rec.image}"


def check_images_exist(records: Sequence) -> None:
    """Every caption must point to an image file on disk; name the first missing ones and where they appear."""
    from xmodal.data.images import image_exists

    missing = [rec for rec in records if not image_exists(rec.image)]
    if missing:
        first = "; ".join(f"{_where(r)}: {r.image}" for r in missing[:3])
        raise DataError(
            f"{len(missing)} image file(s) referenced by captions are missing ({first}); fix the paths "
            "(relative paths are resolved against the data file's folder) or drop those rows"
        )


class _ImageFiles(torch.utils.data.Dataset):
    """Image files through the model's eval transform; an unreadable file is a DataError naming it."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from xmodal.data.images import open_rgb

        try:
            image = open_rgb(self.paths[i])  # a file or a tar shard's member
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {self.paths[i]} ({type(e).__name__}: {e}); fix or remove it") from e
        return self.transform(image)


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from xmodal.progress import progress

    return progress(iterable, total=total, desc=desc, unit="batch", enabled=enabled)


@torch.inference_mode()
def encode_images(
    model: torch.nn.Module,
    transform: Callable,
    paths: Sequence[str],
    sink: Callable[[int, np.ndarray], None],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    precision: str = "auto",
) -> None:
    """Encode image files in order; `sink(start, embeddings)` receives each normalised fp32 batch."""
    from xmodal.device import autocast

    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    start = 0
    total = (len(paths) + batch_size - 1) // batch_size
    for images in _progress(loader, total, "encoding images", progress):
        with autocast(device, precision):
            emb = model.encode_image(images.to(device))
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        sink(start, emb.cpu().numpy())
        start += len(emb)


@torch.inference_mode()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable,
    captions: Sequence[str],
    sink: Callable[[int, np.ndarray], None],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
    precision: str = "auto",
) -> None:
    """Tokenise and encode captions in order; `sink(start, embeddings)` receives each normalised batch."""
    from xmodal.device import autocast

    device = torch.device(device)
    total = (len(captions) + batch_size - 1) // batch_size
    for start, stop in _progress(_batches(len(captions), batch_size), total, "encoding captions", progress):
        tokens = tokenizer(list(captions[start:stop])).to(device)
        with autocast(device, precision):
            emb = model.encode_text(tokens)
        sink(start, torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())


def model_identity(loaded: Any) -> str:
    """The model's fingerprint (weights + preprocessing), computed when the loader did not provide one."""
    fingerprint = getattr(loaded, "fingerprint", None)
    if fingerprint:
        return str(fingerprint)
    from xmodal.fingerprint import model_fingerprint

    return model_fingerprint(loaded.model, {"preprocess": repr(getattr(loaded, "preprocess", None))})


def encode_image_text(
    loaded: Any,
    data: str | os.PathLike | RetrievalSet,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    text_batch_size: int | None = None,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    precision: str = "auto",
    progress: bool = True,
    image_key: str | None = None,
    caption_key: str | None = None,
    sep: str | None = None,
) -> ImageTextEmbeddings:
    """Embeddings of every image and caption in `data`, reusing the cache when model and data are unchanged.

    `data` is an image-text file (read with the keys and separator given) or a `RetrievalSet` (a named
    evaluation set, `xmodal.data.eval_sets`); the cache keys on its identity (data files, images, reader, split).
    `loaded` carries `model` (with encode_image/encode_text), `preprocess`, `tokenizer` and ideally
    `fingerprint` (as from `xmodal.teachers.clip.load_open_clip`).
    """
    from xmodal.data.eval_sets import open_retrieval_set
    from xmodal.device import resolve_device

    if not isinstance(data, RetrievalSet):
        data = open_retrieval_set(Path(data), image_key=image_key, caption_key=caption_key, sep=sep)
    records = data.records
    paths, captions, text_to_image = flatten_records(records)
    check_images_exist(records)
    device = resolve_device(device)
    settings = {"normalize": True, "dtype": "float16", "precision": precision, "keys": [image_key, caption_key, sep]}
    store = key = None
    if cache_dir is not None:
        store = EmbeddingStore(cache_dir)
        key = cache_key(model_identity(loaded), data.identity().digest, settings)
        hit = store.load(key)
        if hit is not None:
            log.info("using cached embeddings %s", hit.path)
            return ImageTextEmbeddings(hit.image, hit.text, hit.text_to_image, paths, from_cache=True)

    model = loaded.model.to(device).eval()
    kwargs = dict(device=device, progress=progress, precision=precision)
    tb = text_batch_size or max(batch_size, 256)
    if store is None:
        image_out: list[tuple[int, np.ndarray]] = []
        text_out: list[tuple[int, np.ndarray]] = []
        encode_images(model, loaded.preprocess, paths, lambda s, e: image_out.append((s, e)),
                      batch_size=batch_size, num_workers=num_workers, **kwargs)
        encode_texts(model, loaded.tokenizer, captions, lambda s, e: text_out.append((s, e)), batch_size=tb, **kwargs)
        image = np.concatenate([e for _, e in image_out]).astype(np.float16)
        text = np.concatenate([e for _, e in text_out]).astype(np.float16)
        return ImageTextEmbeddings(image, text, text_to_image, paths)

    meta = {
        "data": data.source,
        "model": getattr(loaded, "name", type(loaded.model).__name__),
        "pretrained": getattr(loaded, "pretrained", None),
        "slot": f"{data.slot}|{getattr(loaded, 'name', '')}|{getattr(loaded, 'pretrained', '')}",
        "settings": settings,
    }
    if data.settings:
        meta["data_set"] = data.name
    with store.writer(key, len(paths), len(captions), text_to_image, meta) as writer:
        encode_images(model, loaded.preprocess, paths, lambda s, e: writer.write("image", s, e),
                      batch_size=batch_size, num_workers=num_workers, **kwargs)
        encode_texts(model, loaded.tokenizer, captions, lambda s, e: writer.write("text", s, e),
                     batch_size=tb, **kwargs)
    hit = store.load(key)
    if hit is None:  # pragma: no cover - the entry was just written
        raise RuntimeError(f"embedding cache entry {store.path(key)} vanished right after it was written")
    return ImageTextEmbeddings(hit.image, hit.text, hit.text_to_image, paths)

"""On-disk embedding cache: fp16 memory-mapped arrays under a key that changes with model, data or settings.

An entry is a folder `<root>/<key>/` with `image.npy`, `text.npy` (fp16, memory-mapped on load),
`text_to_image.npy` and `meta.json`. It is written in a hidden temporary folder (`.<key>.<random>.tmp`) and
renamed into place only when complete, so an interrupted run never leaves a half-written entry. Entries for
the same model name and data file under a different key are stale and removed on commit.

One writer per entry: `.<key>.lock` (`xmodal.lock`) is held while the entry is written or removed, and a second
writer is refused, naming the holder's process id. Temporary folders of runs that were killed are removed by the
next writer, once nobody holds their entry's lock. The key comes from the shared fingerprint recipe
(`xmodal.fingerprint`): model weights + preprocessing, the data file's content and the images' states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.errors import DataError
from xmodal.fingerprint import data_identity, file_digest, hash_json
from xmodal.io import atomic_write_json
from xmodal.lock import FolderLock, LockedError

log = logging.getLogger(__name__)

STORE_VERSION = 1
ARRAYS = ("image", "text")
FP16_MAX = float(np.finfo(np.float16).max)


TEMP_SUFFIXES = (".tmp", ".trash")

__all__ = ["CachedEmbeddings", "EmbeddingStore", "EntryWriter", "cache_key", "data_fingerprint", "file_digest"]


def data_fingerprint(data_path: str | os.PathLike, image_paths: Sequence[str]) -> str:
    """Hash of the data file's bytes and every image's path, size and mtime (images are not re-read)."""
    return data_identity({"data": data_path}, media=image_paths).digest


def cache_key(model_fingerprint: str, data_fingerprint: str, settings: dict[str, Any]) -> str:
    """The entry key: equal only for the same weights, preprocessing, data and encoding settings."""
    return hash_json({"version": STORE_VERSION, "model": model_fingerprint, "data": data_fingerprint, **settings})


@dataclass
class CachedEmbeddings:
    """One cache entry: fp16 image [I, D] and text [T, D] arrays (memory-mapped) and the caption → image map."""

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    meta: dict[str, Any]
    path: Path


class EntryWriter:
    """Fills one entry in a temporary folder; arrays are created on the first write, when the width is known."""

    def __init__(self, tmp: Path, sizes: dict[str, int]):
        self.tmp = tmp
        self.sizes = sizes
        self.arrays: dict[str, np.memmap] = {}
        self.filled = dict.fromkeys(sizes, 0)

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        """Store rows [start, start + len(values)) of array `name` as fp16."""
        values = np.asarray(values, dtype=np.float32)
        if not np.isfinite(values).all():
            bad = int(np.nonzero(~np.isfinite(values).all(axis=1))[0][0]) + start
            raise DataError(f"{name} embedding {bad} contains NaN or infinite values; the model produced it")
        if np.abs(values).max(initial=0.0) > FP16_MAX:
            raise DataError(f"{name} embeddings exceed the fp16 range near row {start}; store normalised embeddings")
        arr = self.arrays.get(name)
        if arr is None:
            arr = np.lib.format.open_memmap(
                self.tmp / f"{name}.npy", mode="w+", dtype=np.float16, shape=(self.sizes[name], values.shape[1])
            )
            self.arrays[name] = arr
        elif values.shape[1] != arr.shape[1]:
            raise DataError(f"{name} embeddings changed width from {arr.shape[1]} to {values.shape[1]}")
        arr[start : start + len(values)] = values
        self.filled[name] += len(values)

    def _finish(self) -> dict[str, list[int]]:
        shapes = {}
        for name, size in self.sizes.items():
            if name not in self.arrays or self.filled[name] != size:
                raise RuntimeError(f"cache entry incomplete: {self.filled[name]} of {size} {name} rows written")
            arr = self.arrays.pop(name)
            arr.flush()
            shapes[name] = list(arr.shape)
            del arr
            with open(self.tmp / f"{name}.npy", "rb+") as f:
                os.fsync(f.fileno())
        return shapes


class EmbeddingStore:
    """A folder of cache entries keyed by `cache_key`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> CachedEmbeddings | None:
        """The entry `key` memory-mapped, or None when absent or unreadable (a broken entry is removed)."""
        path = self.path(key)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in ARRAYS}
            mapping = np.load(path / "text_to_image.npy")
            ok = (
                meta.get("key") == key
                and all(list(arrays[n].shape) == meta["shapes"][n] for n in ARRAYS)
                and arrays["image"].dtype == np.float16
                and mapping.shape == (arrays["text"].shape[0],)
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("embedding cache entry %s is unreadable (%s); recomputing", path, e)
            ok = False
        if not ok:
            log.warning("embedding cache entry %s does not match its metadata; recomputing", path)
            self.invalidate(key)
            return None
        return CachedEmbeddings(arrays["image"], arrays["text"], mapping, meta, path)

    # ------------------------------------------------------------ locking

    def _lock(self, key: str) -> FolderLock:
        """Take the entry's lock or raise LockedError naming the process that writes it."""
        lock = FolderLock(self.root, "embedding-store entry", name=f".{key}.lock")
        try:
            return lock.acquire()
        except LockedError as e:
            who = f"process {e.holder}" if e.holder else "another process"
            raise LockedError(
                f"embedding-store entry {key} in {self.root} is being written by {who}; wait for it to finish "
                "or stop it (or use another cache folder)", e.holder
            ) from None

    def _unlock(self, lock: FolderLock) -> None:
        """Remove the lock file while still holding it, then release (no lock files pile up)."""
        with contextlib.suppress(OSError):
            os.unlink(lock.path)
        lock.release()

    @contextlib.contextmanager
    def _locked(self, key: str, *, wait_free: bool = True) -> Iterator[bool]:
        """Hold the entry's lock for the block; with `wait_free=False`, yield False instead of raising when held."""
        try:
            lock = self._lock(key)
        except LockedError:
            if wait_free:
                raise
            yield False
            return
        try:
            yield True
        finally:
            self._unlock(lock)

    def clean_stale(self) -> list[Path]:
        """Remove temporary folders left by killed runs (of entries nobody is writing now); return them."""
        if not self.root.is_dir():
            return []
        stale: dict[str, list[Path]] = {}
        for p in self.root.iterdir():
            if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIXES) and p.is_dir():
                stale.setdefault(p.name[1:].split(".", 1)[0], []).append(p)
        removed = []
        for key, paths in sorted(stale.items()):
            with self._locked(key, wait_free=False) as free:
                if not free:
                    continue  # a live writer: its temp folder is in use
                for p in paths:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        if removed:
            log.info("removed %d temporary folder(s) left in %s by interrupted runs", len(removed), self.root)
        return removed

    # ------------------------------------------------------------ writing

    @contextlib.contextmanager
    def writer(
        self, key: str, num_images: int, num_texts: int, text_to_image: np.ndarray, meta: dict[str, Any]
    ) -> Iterator[EntryWriter]:
        """Write an entry; it appears under `key` only if the block completes, and replaces stale entries.

        The entry is locked while it is written: a second writer of the same key is refused with LockedError.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        with self._locked(key):
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=self.root))
            try:
                writer = EntryWriter(tmp, {"image": num_images, "text": num_texts})
                yield writer
                shapes = writer._finish()
                np.save(tmp / "text_to_image.npy", np.asarray(text_to_image, dtype=np.int64))
                atomic_write_json(tmp / "meta.json", {**meta, "key": key, "version": STORE_VERSION,
                                                      "shapes": shapes})
                final = self.path(key)
                if final.exists():
                    self._remove(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        slot = meta.get("slot")
        if slot is not None:
            for other in self.entries():
                if other.name != key and self._meta(other).get("slot") == slot:
                    with self._locked(other.name, wait_free=False) as free:
                        if free:
                            log.info("removing stale embedding cache entry %s", other)
                            self._remove(other)

    def entries(self) -> list[Path]:
        """Complete entries (folders with meta.json)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file())

    def invalidate(self, key: str) -> None:
        """Remove the entry `key` if present (unless a writer is replacing it right now)."""
        path = self.path(key)
        if path.exists():
            with self._locked(key, wait_free=False) as free:
                if free:
                    self._remove(path)

    def _remove(self, path: Path) -> None:
        # rename first so a reader never sees a half-deleted entry under a valid key
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".trash", dir=self.root))
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _meta(path: Path) -> dict[str, Any]:
        try:
            return json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            return {}

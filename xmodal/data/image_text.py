"""Image-text data sets in open_clip's formats (CSV/TSV with `filepath`/`title`, JSON lines), with captions
grouped per image for retrieval and unreadable images skipped or reported by file and line.

Sample keys are the image reference as written in the file (normalised, e.g. `./img/a.png` → `img/a.png`), so they
stay with their image when rows are reordered or the folder moves. With `caption_sampling="all"` each caption is
a sample, keyed `<image>#<8 hex digits of the caption's blake2b>`; an (image, caption) pair repeated in the file
gets `.2`, `.3`, ... in file order (same inputs, so which repeat is which does not matter) and a warning.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import get_spawning_popen
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DELIMITED = {".csv": None, ".tsv": "\t"}  # None: tab when the header holds a tab (open_clip's default), else comma
JSONL = (".jsonl", ".ndjson")
IMAGE_KEYS = ("filepath", "image", "image_path", "file_name", "path")  # tried in order when no key is set
CAPTION_KEYS = ("title", "captions", "caption", "text")
ON_ERROR = ("skip", "raise")
CAPTION_SAMPLING = ("first", "random", "all")


def _image_errors() -> tuple[type[BaseException], ...]:
    """What a missing, truncated or corrupt image file raises while opening or decoding."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass
class ImageTextRecord:
    """One image (absolute path) and all its captions, in file order; `line` is where it first appears.

    `ref` is the image reference as written in the file (normalised): the sample key. `lines` holds each
    caption's line.
    """

    image: str
    captions: list[str] = field(default_factory=list)
    line: int = 0
    source: str = ""
    ref: str = ""
    lines: list[int] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.source else f"line {self.line}"


def _resolve(root: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return os.path.normpath(p if p.is_absolute() else root / p)


def _pick_key(given: str | None, available: Sequence[str], candidates: Sequence[str], what: str, option: str,
              path: Path, where: str) -> str:
    if given is not None:
        if given in available:
            return given
        raise DataError(
            f"{path}: {where} has no {what} {given!r}; available: {', '.join(map(repr, available)) or 'none'}. "
            f"Set {option} to the one that holds the {what.split()[0]}s"
        )
    for key in candidates:
        if key in available:
            return key
    raise DataError(
        f"{path}: {where} has none of the usual {what}s ({', '.join(map(repr, candidates))}); "
        f"available: {', '.join(map(repr, available)) or 'none'}. Set {option} to the one that holds the "
        f"{what.split()[0]}s"
    )


class _Grouper:
    """Collects (image, caption) rows into records keyed by absolute image path, keeping first-seen order."""

    def __init__(self, path: Path):
        self.path, self.root = path, path.parent
        self.records: dict[str, ImageTextRecord] = {}

    def add(self, image: Any, captions: Sequence[Any], line: int, image_key: str, caption_key: str) -> None:
        where = f"{self.path}:{line}"
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: empty or missing image path in {image_key!r}; every row needs an image")
        clean = []
        for cap in captions:
            if not isinstance(cap, str) or not cap.strip():
                raise DataError(f"{where}: empty caption in {caption_key!r} for image {image!r}; "
                                "remove the row or fill in its caption")
            clean.append(cap.strip())
        if not clean:
            raise DataError(f"{where}: no captions in {caption_key!r} for image {image!r}")
        key = _resolve(self.root, image.strip())
        rec = self.records.get(key)
        if rec is None:
            self.records[key] = ImageTextRecord(key, clean, line, str(self.path), os.path.normpath(image.strip()),
                                                [line] * len(clean))
        else:
            rec.captions.extend(clean)
            rec.lines.extend([line] * len(clean))

    def result(self) -> list[ImageTextRecord]:
        if not self.records:
            raise DataError(f"{self.path}: holds a header but no records")
        return list(self.records.values())


def _read_delimited(path: Path, image_key: str | None, caption_key: str | None, sep: str | None):
    with open(path, encoding="utf-8-sig", newline="") as f:
        header_line = f.readline()
        if not header_line.strip():
            raise DataError(f"{path}: empty file; expected a header line with {IMAGE_KEYS[0]!r} and "
                            f"{CAPTION_KEYS[0]!r} columns")
        if sep is None:
            sep = DELIMITED.get(path.suffix.lower()) or ("\t" if "\t" in header_line else ",")
        f.seek(0)
        reader = csv.reader(f, delimiter=sep)
        header = [h.strip() for h in next(reader)]
        sep_name = "tab" if sep == "\t" else repr(sep)
        where = f"header (separator {sep_name})"
        img_col = header.index(_pick_key(image_key, header, IMAGE_KEYS, "image column", "image_key", path, where))
        cap_name = _pick_key(caption_key, header, CAPTION_KEYS, "caption column", "caption_key", path, where)
        cap_col = header.index(cap_name)
        group = _Grouper(path)
        start = reader.line_num + 1
        for row in reader:
            line = start
            start = reader.line_num + 1
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{line}: {len(row)} fields where the header has {len(header)} (separator {sep_name}); "
                    "check the separator (sep=...) and quoting"
                )
            group.add(row[img_col], [row[cap_col]], line, header[img_col], cap_name)
    return group.result()


def _read_jsonl(path: Path, image_key: str | None, caption_key: str | None):
    group = _Grouper(path)
    seen_any = False
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen_any = True
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
            keys = list(obj)
            where = f"line {line_no}"
            ik = _pick_key(image_key, keys, IMAGE_KEYS, "image key", "image_key", path, where)
            ck = _pick_key(caption_key, keys, CAPTION_KEYS, "caption key", "caption_key", path, where)
            value = obj[ck]
            captions = value if isinstance(value, list) else [value]
            group.add(obj[ik], captions, line_no, ik, ck)
    if not seen_any:
        raise DataError(f"{path}: empty file; expected one JSON object per line with an image and caption(s)")
    return group.result()


def read_records(
    path: str | os.PathLike,
    image_key: str | None = None,
    caption_key: str | None = None,
    sep: str | None = None,
) -> list[ImageTextRecord]:
    """Read a CSV/TSV or JSON-lines image-text file into one record per image with all its captions.

    Relative image paths are resolved against the file's folder. Without keys, the usual names are tried
    (`filepath`/`title` as open_clip writes them, then `image`, `caption(s)`, `text`, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image-text file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in DELIMITED or sep is not None:
            return _read_delimited(path, image_key, caption_key, sep)
        if suffix in JSONL:
            return _read_jsonl(path, image_key, caption_key)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed delimited text ({e})") from e
    raise DataError(
        f"{path}: unknown image-text format {suffix!r}; use .csv, .tsv, .jsonl or .ndjson (or pass sep= for "
        "another delimited file)"
    )


def caption_keys(records: Sequence[ImageTextRecord]) -> list[str]:
    """One stable key per (image, caption) pair, in record then caption order (see the module docstring)."""
    keys: list[str] = []
    seen: dict[str, int] = {}
    repeats: list[str] = []
    for rec in records:
        lines = rec.lines if len(rec.lines) == len(rec.captions) else [rec.line] * len(rec.captions)
        for caption, line in zip(rec.captions, lines):
            key = f"{rec.ref or rec.image}#{hashlib.blake2b(caption.encode('utf-8'), digest_size=4).hexdigest()}"
            n = seen[key] = seen.get(key, 0) + 1
            if n > 1:
                key = f"{key}.{n}"
                repeats.append(f"{rec.source}:{line}" if rec.source else f"line {line}")
            keys.append(key)
    if repeats:
        log.warning("%s: %d (image, caption) pair(s) repeat an earlier row (first: %s); each repeat is its own "
                    "sample, keyed <image>#<caption hash>.<n>", records[0].source or "image-text data",
                    len(repeats), repeats[0])
    return keys


class ImageTextDataset:
    """A torch-compatible map-style data set of image-caption pairs.

    Items are dicts `{"id": sample key, "image": transform(PIL RGB), "text": token ids or caption, "index",
    "image_index"}`. A missing or unreadable image raises DataError (`on_error="raise"`) or yields None
    (`"skip"`), is logged once and counted in `skipped` — shared with DataLoader workers. The engine replaces
    a None by another sample; `collate_image_text` (outside the engine) drops it.
    `caption_sampling`: "first" caption per image, a "random" one, or "all" (one item per image-caption pair).
    Randomness (the caption drawn, a random `transform`) is a pure function of (seed, sample key, epoch):
    the engine calls `set_epoch` in every loading process.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        *,
        on_error: str = "skip",
        caption_sampling: str = "first",
        seed: int = 0,
        image_key: str | None = None,
        caption_key: str | None = None,
        sep: str | None = None,
    ):
        from xmodal.registry import suggest

        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}"
                              f"{suggest(str(on_error), ON_ERROR)}")
        if caption_sampling not in CAPTION_SAMPLING:
            raise ConfigError(f"caption_sampling must be one of {', '.join(CAPTION_SAMPLING)}, got "
                              f"{caption_sampling!r}{suggest(str(caption_sampling), CAPTION_SAMPLING)}")
        self.path = str(path)
        self.records = read_records(path, image_key, caption_key, sep)
        self.transform = transform
        self.tokenizer = tokenizer
        self.on_error = on_error
        self.caption_sampling = caption_sampling
        self.seed = int(seed)
        self.epoch = 0
        # cumulative caption counts: item k of "all" mode is caption (k - starts[i]) of record i
        self._starts = np.cumsum([0] + [len(r.captions) for r in self.records[:-1]]).tolist()
        self._n_pairs = sum(len(r.captions) for r in self.records)
        self._keys = caption_keys(self.records) if caption_sampling == "all" else None
        # one byte per record, in shared memory so DataLoader workers' skips are seen by the main process
        self._bad = mp.RawArray("b", len(self.records))

    def __len__(self) -> int:
        return self._n_pairs if self.caption_sampling == "all" else len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change which caption "random" sampling draws and what a random transform does, per sample."""
        self.epoch = int(epoch)

    def sample_key(self, index: int) -> str:
        """The item's stable key: its image reference as written (plus a caption hash in "all" mode)."""
        if self._keys is not None:
            return self._keys[self._check(index)]
        return self.records[self._check(index)].ref

    @property
    def skipped(self) -> int:
        """How many distinct images could not be read so far (across DataLoader workers)."""
        return int(np.count_nonzero(np.frombuffer(self._bad, dtype=np.int8)))

    @property
    def skipped_images(self) -> list[str]:
        bad = np.flatnonzero(np.frombuffer(self._bad, dtype=np.int8))
        return [self.records[i].image for i in bad]

    def _check(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items in {self.path}")
        return index % len(self)

    def locate(self, index: int) -> tuple[int, int]:
        """(record index, caption index) of an item; a "random" caption depends on (seed, image key, epoch)."""
        from xmodal.engine.data import sample_seed

        index = self._check(index)
        if self.caption_sampling == "all":
            rec = bisect.bisect_right(self._starts, index) - 1
            return rec, index - self._starts[rec]
        if self.caption_sampling == "random":
            rec = self.records[index]
            rng = np.random.default_rng(sample_seed(self.seed, rec.ref, self.epoch))
            return index, int(rng.integers(len(rec.captions)))
        return index, 0

    def load_image(self, rec_index: int):
        """The record's image as RGB, or None when it is unreadable and on_error="skip"."""
        from PIL import Image

        rec = self.records[rec_index]
        try:
            with Image.open(rec.image) as im:
                return im.convert("RGB")
        except _image_errors() as e:
            reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            msg = f"{rec.where}: cannot read image {rec.image} ({reason})"
            if self.on_error == "raise":
                raise DataError(f"{msg}; fix or remove it, or use on_error='skip' to leave it out") from e
            if not self._bad[rec_index]:
                self._bad[rec_index] = 1
                log.warning("%s; skipping it", msg)
            return None

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        from xmodal.engine.data import sample_seed, seeded_rngs

        rec_index, cap_index = self.locate(index)
        image = self.load_image(rec_index)
        if image is None:
            return None
        key = self.sample_key(index)
        caption = self.records[rec_index].captions[cap_index]
        if self.transform is not None:
            with seeded_rngs(sample_seed(self.seed, key, self.epoch)):
                image = self.transform(image)
        text: Any = caption
        if self.tokenizer is not None:
            text = self.tokenizer([caption])[0]
        return {"id": key, "image": image, "text": text, "index": int(index), "image_index": rec_index}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if get_spawning_popen() is None:
            # plain pickling (not starting a worker): share-nothing copy of the skip flags
            state["_bad"] = bytes(self._bad)
        return state

    def __setstate__(self, state: dict) -> None:
        bad = state["_bad"]
        if isinstance(bad, bytes):
            arr = mp.RawArray("b", len(bad))
            arr[:] = bad
            state["_bad"] = arr
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"ImageTextDataset({self.path!r}, images={len(self.records)}, items={len(self)}, "
                f"caption_sampling={self.caption_sampling!r}, on_error={self.on_error!r})")


def collate_image_text(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack items, leaving out skipped (None) ones; None when the whole batch was skipped.

    `batch["skipped"]` counts the items left out of this batch.
    """
    from torch.utils.data import default_collate

    items = [b for b in batch if b is not None]
    if not items:
        return None
    out = default_collate(items)
    out["skipped"] = len(batch) - len(items)
    return out

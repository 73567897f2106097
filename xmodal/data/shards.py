"""Webdataset tar shards of image-caption pairs: writing them from an image-text file, and a streaming, rank- and
worker-split, resumable reader for training.

A shard sample (as `xmodal data shards` writes it) holds the image bytes under their extension (`jpg`, `png` or
`webp`), the first caption as `txt` and `json` = {"key": the CSV data set's sample key, "captions": [...]}. The tar
key is that sample key made safe for tar names (see `tar_keys`). Beside the tars, `shards.json` records each
shard's sample and caption counts and size, so a reader knows an epoch's length without reading the tars (without
the index, or when a shard's size no longer matches it, the reader counts the shard's members itself).

Reading (`ShardDataset`, `ShardLoader`). The sample key is the json's `key` (else the tar key), so caption choice,
augmentation and teacher caches agree with the CSV data set of the same images. An epoch:

1. the shard list is permuted with a seed that is a pure function of (seed, epoch);
2. reader slot `s = rank * num_workers + worker` takes shards `s, s + S, s + 2S, ...` (S = world_size ×
   num_workers), so ranks and workers read disjoint samples that together cover the epoch;
3. a slot's samples pass a shuffle buffer (`shuffle_buffer` samples) whose RNG is seeded from
   (seed, epoch, rank, worker), still as raw bytes;
4. each worker cuts its stream into full local batches (the last incomplete one is dropped, fewer than
   `local_batch` samples per worker and epoch); a rank's batches come round-robin over its workers (worker 0's
   first batch, worker 1's first, ...; a worker that has run out drops out of the rotation);
5. every rank stops after the same number of batches, the smallest number any rank can form that epoch (from
   the shard counts), so DDP ranks take the same steps and none waits on another.

Per-sample randomness (the caption drawn by `caption_sampling: random`, a random transform) is a pure function of
(seed, sample key, epoch), as for map-style data (`xmodal.engine.data.sample_seed`). An unreadable sample (bad
image bytes, no image member, no caption) is replaced by a copy of a readable sample of the same batch, chosen from
(seed, its key, epoch), so batches keep their size; its key is reported with the batch (`BatchStream.skipped_keys`).

Resume is exact and cheap: the position is (epoch, batch), each worker computes how many of its own batches came
before it, and skips that many × `local_batch` samples as raw bytes, before any image is decoded. The one bound: a
local batch in which every sample was unreadable reads further samples until one is readable; a resume point
after such a batch shifts that worker's stream by the samples read ahead. The stream is deterministic per
(seed, epoch, world_size, num_workers, local batch): resuming with another world size or worker count continues at
the same batch number of a differently arranged epoch.

Random access (`ShardRecords`): the same samples by index, for `xmodal cache` and other index-addressed tools;
`read_samples` iterates every sample undecoded, in shard order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xmodal.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INDEX = "shards.json"
INDEX_FORMAT = "xmodal-shards/1"
IMAGE_KEYS = ("jpg", "png", "webp")  # tried in order; ".jpeg" members are read as "jpeg" (add it to the keys)
DEFAULT_PATTERN = "shard-%06d.tar"
_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_CAPTION_SAMPLING = ("first", "random", "all")
MAX_UNREADABLE = 64  # samples read past an all-unreadable batch before the shards count as broken


# ---------------------------------------------------------------- names


def check_pattern(pattern: str) -> re.Match:
    """The one `%d` field of a shard name pattern ("shard-%06d.tar"), or a ConfigError naming the problem."""
    fields = list(re.finditer(r"%(0?\d*)d", pattern))
    if len(fields) != 1 or "/" in pattern or os.sep in pattern or not pattern.endswith(".tar"):
        raise ConfigError(f"--pattern {pattern!r}: give a file name ending in .tar with exactly one %d field for the "
                          f"shard number and no folder, e.g. {DEFAULT_PATTERN!r}")
    return fields[0]


def brace_pattern(folder: str | os.PathLike, pattern: str, count: int) -> str:
    """The brace pattern naming shards 0..count-1 written with `pattern` ("DIR/shard-{000000..000003}.tar")."""
    m = check_pattern(pattern)
    spec = m.group(0)
    middle = spec % 0 if count == 1 else "{" + spec % 0 + ".." + spec % (count - 1) + "}"
    return str(Path(folder) / (pattern[:m.start()] + middle + pattern[m.end():]))


def tar_keys(refs: Sequence[str]) -> list[str]:
    """Tar-safe sample keys: each reference with every run of characters other than letters, digits, `_` and `-`
    made `_` (webdataset splits a member name at its first dot, and `/` would make folders). References that
    would share a safe name all get `-<8 hex digits of the reference's blake2b>` appended, so keys stay unique."""
    safe = [re.sub(r"[^A-Za-z0-9_-]+", "_", ref).strip("_") or "sample" for ref in refs]
    counts: dict[str, int] = {}
    for s in safe:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else f"{s}-{hashlib.blake2b(r.encode(), digest_size=4).hexdigest()}"
            for s, r in zip(safe, refs)]


def shard_paths(pattern: str | Sequence[str], root: str | os.PathLike | None = None) -> list[str]:
    """The shard files a brace pattern names ("DIR/shard-{000000..000127}.tar"; several joined by `::`), as
    absolute paths; relative ones are taken inside `root`. Every file must exist."""
    from webdataset.shardlists import expand_urls

    names = list(pattern) if not isinstance(pattern, str) else expand_urls(pattern)
    paths = []
    for name in names:
        p = Path(os.path.expanduser(name))
        if not p.is_absolute() and root is not None:
            p = Path(root) / p
        paths.append(os.path.normpath(os.path.abspath(p)))
    if not paths:
        raise ConfigError(f"data.shards {pattern!r} names no files")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"data.shards: {len(missing)} of {len(paths)} shard files do not exist (first: "
                          f"{missing[0]}); check the brace pattern (`xmodal data shards` prints the one to use)")
    return paths


# ---------------------------------------------------------------- writing


@dataclass
class ShardSummary:
    """What `write_shards` wrote: the shard files, their brace pattern and counts, and the images left out."""

    out: Path
    files: list[Path]
    pattern: str
    samples: int
    captions: int
    skipped: list[str] = field(default_factory=list)
    reencoded: int = 0

    @property
    def index(self) -> Path:
        return self.out / INDEX


def _image_payload(path: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image file: jpg/png/webp bytes as they are, other formats re-encoded as PNG."""
    ext = _EXT.get(Path(path).suffix.lower())
    if ext is not None:
        with open(path, "rb") as f:
            return ext, f.read()
    from PIL import Image

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB").save(buf, format="PNG")
    return "png", buf.getvalue()


def write_shards(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    pattern: str = DEFAULT_PATTERN,
    max_count: int = 10000,
    max_size: float = 3e9,
    image_key: str | None = None,
    caption_key: str | None = None,
    sep: str | None = None,
    on_error: str = "skip",
    shuffle_seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardSummary:
    """Write an image-text file's images with all their captions into webdataset tar shards in `out`.

    Each shard is written under a temporary name and renamed when complete; `shards.json` is written last. Images
    that cannot be read are left out and listed (`on_error="skip"`) or stop the run (`"raise"`).
    `shuffle_seed` writes the images in a seeded random order instead of the file's.
    """
    from webdataset import ShardWriter

    from xmodal.data.image_text import _image_errors, read_records
    from xmodal.io import atomic_write_json
    from xmodal.progress import progress as progress_bar

    check_pattern(pattern)
    if max_count < 1:
        raise ConfigError(f"--max-count must be at least 1 sample per shard, got {max_count}")
    if on_error not in ("skip", "raise"):
        raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    records = read_records(source, image_key, caption_key, sep)
    if shuffle_seed is not None:
        records = [records[i] for i in np.random.default_rng(shuffle_seed).permutation(len(records))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    glob = re.sub(r"%0?\d*d", "*", pattern)
    for stale in out.glob(f".{glob}.tmp"):  # what an interrupted run left
        stale.unlink()
    old = sorted(out.glob(glob))
    if (old or (out / INDEX).exists()) and not overwrite:
        raise DataError(f"{out} already holds shards ({len(old)} files like {glob}); choose another --out or "
                        "pass --overwrite to replace them")
    if (out / INDEX).exists():
        (out / INDEX).unlink()  # an index must never describe a half-replaced set

    keys = tar_keys([r.ref or r.image for r in records])
    written: list[dict[str, Any]] = []
    current = {"captions": 0}

    def finished(tmp_name: str) -> None:
        tmp = Path(tmp_name)
        final = tmp.with_name(tmp.name[1:-len(".tmp")])
        os.replace(tmp, final)
        written.append({"name": final.name, "samples": writer.count, "captions": current["captions"],
                        "size": final.stat().st_size})
        current["captions"] = 0

    skipped: list[str] = []
    reencoded = 0
    writer = ShardWriter(str(out / f".{pattern}.tmp"), maxcount=max_count, maxsize=max_size, post=finished,
                         verbose=0, encoder=False, mtime=0)
    try:
        for rec, key in progress_bar(list(zip(records, keys)), desc="shards", unit="img", enabled=progress):
            try:
                ext, data = _image_payload(rec.image)
            except _image_errors() as e:
                reason = "file not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
                msg = f"{rec.where}: cannot read image {rec.image} ({reason})"
                if on_error == "raise":
                    raise DataError(f"{msg}; fix or remove it, or use --on-error skip to leave it out") from e
                log.warning("%s; left out", msg)
                skipped.append(rec.image)
                continue
            reencoded += ext == "png" and Path(rec.image).suffix.lower() != ".png"
            meta = {"key": rec.ref or rec.image, "captions": list(rec.captions)}
            writer.write({"__key__": key, ext: data, "txt": rec.captions[0].encode("utf-8"),
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            current["captions"] += len(rec.captions)
        writer.close()
    except BaseException:
        if writer.tarstream is not None:
            writer.tarstream.close()
        for tmp in out.glob(f".{glob}.tmp"):
            tmp.unlink()
        raise
    for empty in [w for w in written if not w["samples"]]:  # ShardWriter opens a first file even for nothing
        (out / empty["name"]).unlink()
    written = [w for w in written if w["samples"]]
    if not written:
        raise DataError(f"{source}: no image could be read, so no shards were written (first: "
                        f"{skipped[0] if skipped else 'none'})")
    names = {w["name"] for w in written}
    for stale_shard in old:
        if stale_shard.name not in names:
            stale_shard.unlink()
    brace = brace_pattern(out, pattern, len(written))
    index = {"format": INDEX_FORMAT, "source": str(Path(source).resolve()), "pattern": pattern,
             "shards_pattern": brace, "caption_key": "json.captions",
             "samples": sum(w["samples"] for w in written), "captions": sum(w["captions"] for w in written),
             "shards": written, "skipped": skipped}
    atomic_write_json(out / INDEX, index)
    return ShardSummary(out, [out / w["name"] for w in written], brace, index["samples"], index["captions"],
                        skipped, reencoded)


# ---------------------------------------------------------------- reading samples


@dataclass
class ShardSample:
    """One tar sample, undecoded: its key, image bytes and extension, captions, and what is wrong with it if
    anything (`problem`, then it is skipped)."""

    key: str
    image: bytes | None
    ext: str | None
    captions: list[str]
    shard: str
    problem: str | None = None


def _member_text(sample: dict, name: str) -> str | None:
    data = sample.get(name)
    return data.decode("utf-8") if isinstance(data, bytes) else data


def parse_sample(raw: dict, image_keys: Sequence[str] = IMAGE_KEYS, caption_key: str | None = None) -> ShardSample:
    """A grouped tar sample (webdataset's `{"__key__", ext: bytes}`) as a ShardSample.

    `caption_key`: None reads the json's "captions" (xmodal's shards) or else the `txt` member; "txt" (or another
    member name) reads that member as one caption; "json.FIELD" reads a field of the json member (a string or a
    list of strings).
    """
    problems = []
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(_member_text(raw, "json") or "{}")
            if not isinstance(meta, dict):
                meta, _ = {}, problems.append("json member is not an object")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"json member unreadable ({e})")
    key = meta.get("key")
    key = str(key) if isinstance(key, (str, int)) and str(key) else raw["__key__"]
    ext = next((k for k in image_keys if raw.get(k) is not None), None)
    if ext is None:
        problems.append(f"no image member (looked for {', '.join(image_keys)})")
    value: Any
    where = caption_key
    try:
        if caption_key is None:
            value, where = (meta["captions"], "json.captions") if "captions" in meta else (_member_text(raw, "txt"),
                                                                                            "txt")
        elif caption_key.startswith("json."):
            value = meta.get(caption_key[len("json."):])
        else:
            value = _member_text(raw, caption_key)
    except UnicodeDecodeError as e:
        value, _ = None, problems.append(f"caption member not UTF-8 ({e})")
    values = value if isinstance(value, list) else [value]
    captions = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    if not captions and not problems:
        problems.append(f"no caption under {where!r}")
    return ShardSample(key, raw.get(ext) if ext else None, ext, captions, raw.get("__url__", ""),
                       "; ".join(problems) or None)


def iter_tar(path: str) -> Iterator[dict]:
    """A shard's samples as webdataset groups them ({"__key__", "__url__", ext: bytes, ...}), in tar order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files() -> Iterator[dict]:
        with open(path, "rb") as f:
            try:
                for entry in tar_file_iterator(f):
                    entry["__url__"] = path
                    yield entry
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{path}: unreadable tar shard ({e}); rewrite it with `xmodal data shards`") from e

    try:
        yield from group_by_keys(files())
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e


def read_samples(paths: Iterable[str], image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_key: str | None = None) -> Iterator[ShardSample]:
    """Every sample of the shards, in shard then tar order, undecoded (for checks, caches and tools)."""
    for path in paths:
        for raw in iter_tar(path):
            yield parse_sample(raw, image_keys, caption_key)


def decode_image(sample: ShardSample):
    """The sample's image as PIL RGB; raises one of `_image_errors()` when the bytes are not a readable image."""
    from PIL import Image

    if sample.image is None:
        raise ValueError(sample.problem or "no image")
    with Image.open(io.BytesIO(sample.image)) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------- random access


def index_shard(path: str, image_keys: Sequence[str] = IMAGE_KEYS,
                small: Sequence[str] = ("json", "txt")) -> list[tuple[dict, tarfile.TarInfo | None]]:
    """Each sample of a shard as (webdataset-style dict holding the `small` members' bytes and b"" for its image
    member, that image member's header or None), in tar order; image bytes are not read."""
    from webdataset.tariterators import base_plus_ext

    out = []
    try:
        with tarfile.open(path, "r:") as tar:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in tar:
                prefix, suffix = base_plus_ext(m.name)
                if m.isreg() and prefix is not None:
                    groups.setdefault(prefix, {})[suffix.lower()] = m
            for prefix, members in groups.items():
                raw: dict[str, Any] = {"__key__": prefix, "__url__": path}
                for name in small:
                    if name in members:
                        raw[name] = tar.extractfile(members[name]).read()
                ext = next((k for k in image_keys if k in members), None)
                if ext is not None:
                    raw[ext] = b""  # located, read on demand
                out.append((raw, members[ext] if ext else None))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable tar shard ({e}); rewrite it with `xmodal data shards`") from e
    return out


@dataclass
class _Located:
    """A sample's metadata (read at start) and where its image bytes are: (shard, byte offset, size)."""

    key: str
    captions: list[str]
    shard: str
    ext: str | None
    offset: int
    size: int
    problem: str | None


class ShardRecords:
    """Map-style access to the samples of tar shards, like `ImageTextDataset` over a CSV: for `xmodal cache` and
    anything else that addresses samples by index.

    The shards' member headers, json and caption members are read once at start (image bytes are not); an item
    reads its image by offset. Items are `{"id", "image": PIL RGB (after `transform`), "text"}` with the same keys,
    caption choice (`first`, `random` per (seed, key, epoch), or `all`: one item per caption keyed
    `<key>#<caption hash>`) and randomness as the stream and the CSV data set; an unreadable sample gives None
    (`on_error="skip"`, logged, counted in `skipped`) or raises DataError.
    """

    def __init__(self, paths: Sequence[str], *, caption_sampling: str = "first", image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_key: str | None = None, on_error: str = "skip", seed: int = 0,
                 transform: Callable | None = None, tokenizer: Callable | None = None):
        from xmodal.data.image_text import ImageTextRecord, caption_keys

        if caption_sampling not in _CAPTION_SAMPLING:
            raise ConfigError(f"caption_sampling must be one of {', '.join(_CAPTION_SAMPLING)}, got "
                              f"{caption_sampling!r}")
        self.paths = [str(p) for p in paths]
        self.caption_sampling, self.on_error, self.seed = caption_sampling, on_error, int(seed)
        self.transform, self.tokenizer = transform, tokenizer
        self.epoch = 0
        self.samples: list[_Located] = []
        small = ("json", "txt", *([caption_key] if caption_key and "." not in caption_key else []))
        for path in self.paths:
            for raw, member in index_shard(path, image_keys, small):
                s = parse_sample(raw, image_keys, caption_key)
                self.samples.append(_Located(s.key, s.captions, path, s.ext, member.offset_data if member else 0,
                                             member.size if member else 0, s.problem))
        self._items: list[tuple[int, int | None, str]] = []  # (sample, caption or None, key)
        for i, s in enumerate(self.samples):
            if caption_sampling == "all" and s.captions:
                keys = caption_keys([ImageTextRecord(s.key, s.captions, ref=s.key, source=s.shard)])
                self._items.extend((i, c, k) for c, k in enumerate(keys))
            else:
                self._items.append((i, None, s.key))
        self._skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self._items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_key(self, index: int) -> str:
        return self._items[index][2]

    @property
    def skipped(self) -> int:
        """Distinct samples this process could not read so far."""
        return len(self._skipped)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        from xmodal.data.image_text import _image_errors
        from xmodal.data.images import member_ref, read_image_bytes
        from xmodal.engine.data import sample_seed, seeded_rngs

        i, c, key = self._items[index]
        s = self.samples[i]
        problem, image = s.problem, None
        if problem is None:
            try:
                data = read_image_bytes(member_ref(s.shard, s.offset, s.size))
                image = decode_image(ShardSample(s.key, data, s.ext, s.captions, s.shard))
            except _image_errors() as e:
                problem = f"bad image bytes in {s.ext!r} ({type(e).__name__}: {e})"
        if problem is not None:
            msg = f"{s.shard}: sample {key!r}: {problem}"
            if self.on_error == "raise":
                raise DataError(f"{msg}; fix or rewrite the shard, or use on_error='skip' to leave it out")
            if key not in self._skipped:
                self._skipped.add(key)
                log.warning("%s; skipping it", msg)
            return None
        seed = sample_seed(self.seed, key, self.epoch)
        if c is None:
            c = int(np.random.default_rng(seed).integers(len(s.captions))) if self.caption_sampling == "random" else 0
        if self.transform is not None:
            with seeded_rngs(seed):
                image = self.transform(image)
        text: Any = s.captions[c]
        if self.tokenizer is not None:
            text = self.tokenizer([text])[0]
        return {"id": key, "image": image, "text": text, "index": int(index), "image_index": i}

    def __repr__(self) -> str:
        return (f"ShardRecords({len(self.paths)} shards, images={len(self.samples)}, items={len(self)}, "
                f"caption_sampling={self.caption_sampling!r})")


# ---------------------------------------------------------------- counts


@dataclass(frozen=True)
class ShardFile:
    """One shard and its counts: images (tar samples) and items (captions in `caption_sampling: all`, where a
    sample without a readable caption still counts once)."""

    path: str
    samples: int
    captions: int


def _counts_of(path: str, image_keys: Sequence[str], caption_key: str | None) -> tuple[int, int]:
    samples = captions = 0
    for s in read_samples([path], image_keys, caption_key):
        samples += 1
        captions += max(1, len(s.captions))
    return samples, captions


def shard_table(paths: Sequence[str], image_keys: Sequence[str] = IMAGE_KEYS,
                caption_key: str | None = None) -> list[ShardFile]:
    """Each shard's counts, from `shards.json` beside it where the index lists it with the file's current size
    (and the same caption source), else by reading the shard once."""
    indexes: dict[str, dict[str, dict]] = {}
    table, counted = [], []
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in indexes:
            entries: dict[str, dict] = {}
            try:
                index = json.loads(Path(folder, INDEX).read_text())
                if index.get("format") == INDEX_FORMAT and (caption_key in (None, index.get("caption_key"))):
                    entries = {e["name"]: e for e in index.get("shards", [])}
            except (OSError, ValueError, TypeError, KeyError):
                entries = {}
            indexes[folder] = entries
        entry = indexes[folder].get(os.path.basename(path))
        if entry is not None and entry.get("size") == os.path.getsize(path):
            table.append(ShardFile(path, int(entry["samples"]), int(entry["captions"])))
        else:
            samples, captions = _counts_of(path, image_keys, caption_key)
            table.append(ShardFile(path, samples, captions))
            counted.append(path)
    if counted:
        log.info("counted the samples of %d shard(s) by reading them (no %s entry of their current size; first: "
                 "%s)", len(counted), INDEX, counted[0])
    return table


def shard_identity(paths: Sequence[str]):
    """The shards' part of a data identity: each file's path, size and modification time (as for images)."""
    from xmodal.fingerprint import media_digest

    return media_digest(paths)


# ---------------------------------------------------------------- the stream


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each reader slot (rank × worker) reads in an epoch, its full batches, and the batches every
    rank yields (`batches`: the smallest number any rank can form)."""

    slots: list[list[int]]
    slot_batches: list[int]
    num_workers: int
    batches: int

    def order(self, rank: int) -> list[tuple[int, int]]:
        """The rank's batches in yield order, as (worker, the worker's batch number): round-robin over the
        workers, each one dropping out when it has no batch left; cut at `batches`."""
        counts = self.slot_batches[rank * self.num_workers:(rank + 1) * self.num_workers]
        out = []
        for j in range(max(counts, default=0)):
            out.extend((w, j) for w, c in enumerate(counts) if j < c)
        return out[:self.batches]


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer of `size` items: once full, each new item pushes out a random one."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()


@dataclass
class _Item:
    """One stream item before decoding: a sample and, with `caption_sampling: all`, which caption (and its key)."""

    sample: ShardSample
    key: str
    caption: int | None = None


class TransformItem:
    """The default per-item pipeline: `transform` on the image, `tokenizer` on the caption, under the sample's seed."""

    def __init__(self, transform: Callable | None = None, tokenizer: Callable | None = None):
        self.transform, self.tokenizer = transform, tokenizer

    def __call__(self, item: dict[str, Any], seed: int) -> dict[str, Any]:
        from xmodal.engine.data import seeded_rngs

        if self.transform is not None:
            with seeded_rngs(seed):
                item["image"] = self.transform(item["image"])
        if self.tokenizer is not None:
            item["text"] = self.tokenizer([item["text"]])[0]
        return item


class ShardDataset(IterableDataset):
    """Image-caption batches streamed from tar shards for one rank (see the module docstring for an epoch).

    Yields `(position in the epoch, collated batch, keys of samples replaced in it)`; `ShardLoader` puts the
    positions in order. `item_fn(item, seed)` turns `{"id", "image": PIL RGB, "text": caption}` into the training
    item; `seed` is the sample's (seed, key, epoch) seed, under which random transforms must run
    (`TransformItem` does); an `item_fn` with `set_epoch` is told the epoch first, in the loading process.
    `set_epoch` / `set_position` choose what the next iteration yields.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        local_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        caption_sampling: str = "first",
        image_keys: Sequence[str] = IMAGE_KEYS,
        caption_key: str | None = None,
        shuffle_buffer: int = 1000,
        on_error: str = "skip",
        item_fn: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
        collate_fn: Callable | None = None,
        root: str | os.PathLike | None = None,
    ):
        from xmodal.registry import suggest

        if caption_sampling not in _CAPTION_SAMPLING:
            raise ConfigError(f"caption_sampling must be one of {', '.join(_CAPTION_SAMPLING)}, got "
                              f"{caption_sampling!r}{suggest(str(caption_sampling), _CAPTION_SAMPLING)}")
        if on_error not in ("skip", "raise"):
            raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if local_batch < 1:
            raise ConfigError(f"the per-process batch size must be at least 1, got {local_batch}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.paths = shard_paths(shards, root) if isinstance(shards, str) else [str(p) for p in shards]
        self.local_batch, self.rank, self.world_size = int(local_batch), int(rank), int(world_size)
        self.loader_workers = int(num_workers)  # DataLoader worker processes (0: load in this process)
        self.num_workers = max(1, self.loader_workers)  # reader slots per rank
        readers = self.world_size * self.num_workers
        if len(self.paths) < readers:
            raise ConfigError(
                f"data.shards: {len(self.paths)} shard(s) for {self.world_size} process(es) × {self.num_workers} "
                f"loader worker(s) = {readers} readers; each reader needs a shard of its own: write more, smaller "
                "shards (`xmodal data shards --max-count`) or lower train.num_workers"
            )
        self.seed, self.caption_sampling, self.on_error = int(seed), caption_sampling, on_error
        self.image_keys, self.caption_key = tuple(image_keys), caption_key
        self.shuffle_buffer = int(shuffle_buffer)
        self.item_fn = item_fn or TransformItem()
        if collate_fn is None:
            from xmodal.engine.data import collate_samples

            collate_fn = collate_samples
        self.collate_fn = collate_fn
        self.table = shard_table(self.paths, self.image_keys, caption_key)
        self.epoch, self.start = 0, 0

    # -------------------------------------------------------- epoch layout

    def _count(self, f: ShardFile) -> int:
        return f.captions if self.caption_sampling == "all" else f.samples

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's layout over all ranks (the same on every rank: it depends on the seed and the epoch)."""
        order = np.random.default_rng([self.seed % 2**64, int(epoch), 0x5A4D]).permutation(len(self.table))
        readers = self.world_size * self.num_workers
        slots = [order[s::readers].tolist() for s in range(readers)]
        slot_batches = [sum(self._count(self.table[i]) for i in shards) // self.local_batch for shards in slots]
        per_rank = [sum(slot_batches[r * self.num_workers:(r + 1) * self.num_workers])
                    for r in range(self.world_size)]
        batches = min(per_rank)
        if batches == 0:
            worst = int(np.argmin(per_rank))
            raise DataError(
                f"data.shards: in epoch {epoch} process {worst} gets too few samples for one batch of "
                f"{self.local_batch} per loader worker ({len(self.table)} shards, {sum(map(self._count, self.table))} "
                "samples); lower train.batch_size or train.num_workers, or add data"
            )
        return EpochPlan(slots, slot_batches, self.num_workers, batches)

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        return self.plan(self.epoch if epoch is None else epoch).batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def set_position(self, epoch: int, batch: int) -> None:
        """The next iteration yields epoch `epoch` from its batch `batch` on."""
        self.epoch, self.start = int(epoch), int(batch)

    # -------------------------------------------------------- one worker's stream

    def _items(self, shards: Sequence[int]) -> Iterator[_Item]:
        from xmodal.data.image_text import ImageTextRecord, caption_keys

        for i in shards:
            for raw in iter_tar(self.table[i].path):
                s = parse_sample(raw, self.image_keys, self.caption_key)
                if self.caption_sampling != "all" or not s.captions:
                    yield _Item(s, s.key)
                    continue
                keys = caption_keys([ImageTextRecord(s.key, s.captions, ref=s.key, source=s.shard)])
                for c, key in enumerate(keys):
                    yield _Item(s, key, c)

    def sample_seed(self, key: str, epoch: int) -> int:
        from xmodal.engine.data import sample_seed

        return sample_seed(self.seed, key, epoch)

    def _load(self, it: _Item, epoch: int) -> dict[str, Any] | None:
        """The item in its training form, or None (logged) when it cannot be read and on_error is "skip"."""
        from xmodal.data.image_text import _image_errors

        s = it.sample
        problem = s.problem
        image = None
        if problem is None:
            try:
                image = decode_image(s)
            except _image_errors() as e:
                problem = f"bad image bytes in {s.ext!r} ({type(e).__name__}: {e})"
        if problem is not None:
            msg = f"{s.shard}: sample {it.key!r}: {problem}"
            if self.on_error == "raise":
                raise DataError(f"{msg}; fix or rewrite the shard, or use data.on_error: skip to leave it out")
            log.warning("%s; replaced by another sample of its batch (epoch %d)", msg, epoch)
            return None
        seed = self.sample_seed(it.key, epoch)
        if it.caption is not None:
            c = it.caption
        elif self.caption_sampling == "random":
            c = int(np.random.default_rng(seed).integers(len(s.captions)))
        else:
            c = 0
        return self.item_fn({"id": it.key, "image": image, "text": s.captions[c]}, seed)

    def _take(self, items: Iterator[_Item], n: int, shards: Sequence[int], what: str) -> list[_Item]:
        out = []
        for _ in range(n):
            it = next(items, None)
            if it is None:
                names = ", ".join(os.path.basename(self.table[i].path) for i in shards)
                raise DataError(f"data.shards: shards {names} hold fewer samples than counted ({what}); a shard "
                                f"changed while in use, or {INDEX} is stale: remove it to count again")
            out.append(it)
        return out

    def _worker_batches(self, epoch: int, start: int, worker: int) -> Iterator[tuple[int, Any, list[str]]]:
        plan = self.plan(epoch)
        order = plan.order(self.rank)
        mine = [p for p, (w, _) in enumerate(order) if w == worker]  # positions of this worker's batches
        first = sum(1 for p in mine if p < start)
        if first == len(mine):
            return
        shards = plan.slots[self.rank * self.num_workers + worker]
        set_epoch = getattr(self.item_fn, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        rng = np.random.default_rng([self.seed % 2**64, epoch, self.rank, worker, 0xB0FF])
        items = _shuffled(self._items(shards), self.shuffle_buffer, rng)
        self._take(items, first * self.local_batch, shards, "skipping to the resume point")  # raw bytes only
        for position in mine[first:]:
            chunk = self._take(items, self.local_batch, shards, f"epoch {epoch}")
            loaded = [self._load(it, epoch) for it in chunk]
            skipped = [it.key for it, x in zip(chunk, loaded) if x is None]
            good = [x for x in loaded if x is not None]
            while not good:  # every sample of the batch unreadable: read further (the documented resume bound)
                extra = self._take(items, 1, shards, "replacing an unreadable batch")[0]
                x = self._load(extra, epoch)
                if x is not None:
                    good.append(x)
                    break
                skipped.append(extra.key)
                if len(skipped) > MAX_UNREADABLE + self.local_batch:
                    raise DataError(f"data.shards: {len(skipped)} samples in a row could not be read (first: "
                                    f"{skipped[0]!r}); check the shards (on_error: raise shows why)")
            batch = []
            for it, x in zip(chunk, loaded):
                if x is None:
                    pick = np.random.default_rng(self.sample_seed(f"{it.key}#replace", epoch)).integers(len(good))
                    x = good[int(pick)]
                batch.append(x)
            yield position, self.collate_fn(batch), skipped

    def __iter__(self) -> Iterator[tuple[int, Any, list[str]]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.num_workers:
            raise ConfigError(f"ShardDataset was planned for {self.num_workers} loader worker(s) but runs in a "
                              f"DataLoader with {workers}; build it with num_workers={workers}")
        return self._worker_batches(self.epoch, self.start, worker)


class ShardLoader:
    """The rank's batches of a ShardDataset in epoch order, loaded by `num_workers` DataLoader workers.

    An iterable of `(batch, skipped keys)` for `xmodal.engine.BatchStream`: `reports_skipped` tells it to unpack
    them, and `seek(epoch, batch)` lets it resume without loading the batches before the resume point. Workers are
    started for each epoch (not persistent), so they always see the epoch and position set here.
    """

    reports_skipped = True

    def __init__(self, dataset: ShardDataset, *, pin_memory: bool = False):
        self.dataset = dataset
        self.pin_memory = pin_memory

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def seek(self, epoch: int, batch: int) -> None:
        self.dataset.set_position(epoch, batch)

    def __len__(self) -> int:
        return self.dataset.batches_in_epoch()

    def __iter__(self) -> Iterator[tuple[Any, list[str]]]:
        ds = self.dataset
        epoch, start = ds.epoch, ds.start
        total = ds.batches_in_epoch(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=ds.loader_workers, pin_memory=self.pin_memory,
                            persistent_workers=False)
        it = iter(loader)  # workers now hold this epoch and start
        ds.set_epoch(epoch)  # a later iteration starts at batch 0 unless seek says otherwise
        want, pending = start, {}
        for position, batch, skipped in it:
            pending[position] = (batch, skipped)
            while want in pending:
                yield pending.pop(want)
                want += 1
        if want != total or pending:
            raise DataError(f"data.shards: epoch {epoch} yielded batches up to {want} of {total} (out of order: "
                            f"{sorted(pending)[:5]}); a shard changed while in use?")


# ---------------------------------------------------------------- evaluation sets (`--data wds:PATH`)


def _eval_shards(path: str, split: str | None) -> tuple[list[str], Path, str]:
    """Shard files of `wds:PATH`, the folder its class-name and template files are looked for in, and a title.

    PATH is a folder of shards, a folder with one sub-folder of shards per split (CLIP_benchmark's layout:
    ROOT/<split>/*.tar beside ROOT/classnames.txt), or a brace pattern / single tar."""
    p = Path(path)
    if p.is_dir():
        if split is None and not any(p.glob("*.tar")) and (p / "test").is_dir():
            split = "test"
        folder = p / split if split else p
        if not folder.is_dir():
            subs = sorted(d.name for d in p.iterdir() if d.is_dir())
            raise DataError(f"{p}: no split folder {split!r} of shards (it holds: {', '.join(subs) or 'no folders'}); "
                            "pick one with --split, or give the folder that holds the .tar files")
        shards = sorted(str(f) for f in folder.glob("*.tar"))
        if not shards:
            raise DataError(f"{folder}: no .tar shards; write them with `xmodal data shards` or give wds:PATTERN")
        return shards, p, p.resolve().name + (f"/{split}" if split else "")
    if split is not None:
        raise ConfigError(f"--split applies to wds:FOLDER (FOLDER/<split>/*.tar); the pattern {path} names its "
                          "shards itself: drop --split")
    shards = shard_paths(path)
    folder = Path(shards[0]).parent
    return shards, folder, folder.resolve().name


def _check_readable(problems: list[str], shards: Sequence[str]) -> None:
    if problems:
        raise DataError(f"{len(problems)} sample(s) of {shards[0]}{' ...' if len(shards) > 1 else ''} cannot be "
                        f"evaluated ({'; '.join(problems[:3])}); evaluation counts every sample, so fix or rewrite "
                        "those shards")


def read_eval_shards(path: str, *, task: str, split: str | None = None, classnames: str | None = None,
                     templates: str | None = None):
    """`--data wds:PATH` for retrieval (each sample's image with all its captions: json "captions", else `txt`) and
    zero-shot (each sample's image and integer label: a `cls` member or json "label", with class names and
    templates from --classnames/--templates or the files beside the shards, as CLIP_benchmark's wds sets)."""
    from xmodal.data.eval_sets import (
        BUILTIN_CLASSNAMES,
        RETRIEVAL,
        RetrievalSet,
        ZeroShotSet,
        names_and_templates,
        read_lines,
    )
    from xmodal.data.image_text import ImageTextRecord
    from xmodal.data.images import member_ref

    shards, root, title = _eval_shards(path, split)
    settings = {"reader": "wds", "split": split}
    problems: list[str] = []
    if task == RETRIEVAL:
        if classnames is not None or templates is not None:
            raise ConfigError("--classnames/--templates apply to zero-shot sets; drop them for eval retrieval")
        records = []
        for shard in shards:
            for raw, member in index_shard(shard, IMAGE_KEYS, ("json", "txt")):
                s = parse_sample(raw)
                if s.problem:
                    problems.append(f"{shard}: {s.key}: {s.problem}")
                    continue
                records.append(ImageTextRecord(member_ref(shard, member.offset_data, member.size), s.captions,
                                               line=len(records), source=shard, ref=s.key))
        _check_readable(problems, shards)
        if not records:
            raise DataError(f"{path}: the shards hold no samples")
        return RetrievalSet(f"wds:{title}", records, str(Path(shards[0]).parent.resolve()), {}, settings)
    items: list[tuple[str, int]] = []
    for shard in shards:
        for raw, member in index_shard(shard, IMAGE_KEYS, ("json", "cls")):
            key = raw["__key__"]
            label = None
            try:
                if "cls" in raw:
                    label = int(raw["cls"].decode("utf-8").strip())
                elif "json" in raw:
                    label = json.loads(raw["json"]).get("label")
            except (ValueError, UnicodeDecodeError, AttributeError):
                label = None
            if member is None or not isinstance(label, int) or label < 0:
                what = "no image member" if member is None else "no integer label (a `cls` member or json \"label\")"
                problems.append(f"{shard}: {key}: {what}")
                continue
            items.append((member_ref(shard, member.offset_data, member.size), label))
    _check_readable(problems, shards)
    if not items:
        raise DataError(f"{path}: the shards hold no samples")
    top = max(label for _, label in items)
    names_file = None if classnames in BUILTIN_CLASSNAMES else (
        Path(classnames) if classnames else next((d / "classnames.txt" for d in (root, root.parent)
                                                  if (d / "classnames.txt").is_file()), None))
    if names_file is None and classnames is None:
        raise DataError(f"{path}: labels 0..{top} but no class names; put classnames.txt (one name per line, in "
                        f"label order) beside the shards or their split folders, or pass --classnames FILE")
    count = len(BUILTIN_CLASSNAMES[classnames]()) if names_file is None else len(read_lines(names_file, "class names"))
    if top >= count:
        raise DataError(f"{names_file or classnames}: {count} class names, but the shards hold label {top}; write one "
                        "name per label, in label order")
    lookup = names_file.parent if names_file is not None and not classnames else root
    names, prompts, files_used = names_and_templates(
        lookup, [str(i) for i in range(count)], classnames, templates, f"{count} classes", "")
    return ZeroShotSet(f"wds:{title}", names, prompts, items, str(Path(shards[0]).parent.resolve()), files_used,
                       settings)


def _register_eval_sets() -> None:
    from xmodal.data.eval_sets import EVAL_SETS, RETRIEVAL, ZEROSHOT, register_eval_set

    if "wds" not in EVAL_SETS:
        register_eval_set("wds", task=(RETRIEVAL, ZEROSHOT))(read_eval_shards)


_register_eval_sets()

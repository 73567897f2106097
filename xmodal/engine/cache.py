"""Teacher cache: run the teacher once, store its outputs in sharded memory-mapped files, read them per batch.

Layout of a cache folder:

    manifest.json            format, teacher fingerprint, data identity, plan, field schema, finished shards
                             (sizes, blake2b, ids of skipped samples)
    shard_00000/ids.json     [[sample id, augmentation index], ...] in row order
    shard_00000/<m>.<f>.bin  raw little-endian arrays, one per field
    .lock                    held by the process building the cache (`xmodal.lock`): one builder per folder

Fields per modality `m`: `pooled` [rows, D]; 2-D `logits` [rows, C]; token fields stored flat without padding:
`tokens` [Σlen, Dt] and `mask` [Σlen] (uint8) with `tokens_len` [rows] (int32); 3-D `logits` [Σlen, C] with
`logits_len`. Reading gathers rows with numpy fancy indexing on the memmaps and pads to the batch maximum.

A shard folder is written under a temp name and renamed, then the manifest (written atomically) records it:
an interrupted build resumes at the first unrecorded shard. Opening checks every file's exact size (truncation)
and, with `verify="full"`, its blake2b checksum (corruption), naming the shard at fault.

Identity: the fingerprint (`xmodal.fingerprint`) covers the teacher and, from the jobs, the data (content hash of
the data file, media file states, vocabulary ...). The manifest records the data identity; opening a cache whose
data files changed since, or for a fingerprint with other data, is refused with what differs. Rows are keyed by
sample id (the data set's stable `sample_key`), never by row position. A sample the data set cannot read (it
returns None, as with `on_error: skip`) is left out and its id recorded, so a lookup of it says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.features import Features
from xmodal.fingerprint import DataIdentity, describe_difference, fingerprint_parts
from xmodal.io import atomic_write_json
from xmodal.lock import locked
from xmodal.registry import Registry

log = logging.getLogger(__name__)

CACHE_FORMAT = "xmodal-teacher-cache"
CACHE_VERSION = 2  # 2: data identity and skipped samples in the manifest (version 1 caches stay readable)
READ_VERSIONS = (1, 2)
DTYPES = {"float16": np.float16, "float32": np.float32}
FP16_MAX = float(np.finfo(np.float16).max)
_CHUNK = 1 << 22


# ---------------------------------------------------------------- job protocol


@dataclass
class CacheSource:
    """What `xmodal cache` needs from a job: the frozen teacher, the data set to run it on, its fingerprint.

    `dataset` items are dicts with an `id` (str) and optionally an `aug_index` (int), or None for a sample that
    cannot be read (skipped and recorded; `dataset.sample_key(index)` names it); batches collated by
    `collate_fn` (default: `collate_samples`) must carry `ids` and optionally `aug_index`. `fingerprint` is
    `xmodal.fingerprint.fingerprint(teacher, preprocessing, data=data)` and `data` the data identity in it.
    """

    teacher: Callable[[Mapping[str, Any]], Mapping[str, Features]]
    dataset: Any
    fingerprint: str
    collate_fn: Callable | None = None
    batch_size: int = 64
    out_dir: str | os.PathLike | None = None
    meta: dict | None = None
    data: DataIdentity | None = None


CACHE_SOURCES: Registry[Callable[[Any], CacheSource]] = Registry("cache source")


def register_cache_source(job: str) -> Callable:
    """Decorator: `build(cfg) -> CacheSource | (teacher, dataset, fingerprint)` for the job named `job`."""

    def deco(fn: Callable) -> Callable:
        CACHE_SOURCES.register(job, fn)
        return fn

    return deco


def as_cache_source(obj: Any) -> CacheSource:
    if isinstance(obj, CacheSource):
        return obj
    if isinstance(obj, tuple) and len(obj) == 3:
        return CacheSource(*obj)
    raise ConfigError(
        f"a cache source must return CacheSource or (teacher, dataset, fingerprint), got {type(obj).__name__}"
    )


# ---------------------------------------------------------------- helpers


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_array(path: Path, arr: np.ndarray) -> dict[str, Any]:
    """Write raw bytes, fsync, and return the size/checksum record for the manifest."""
    data = np.ascontiguousarray(arr)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": int(data.nbytes), "blake2b": hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _aug_list(aug: Any, n: int) -> list[int]:
    if aug is None:
        return [0] * n
    if isinstance(aug, torch.Tensor):
        aug = aug.reshape(-1).tolist() if aug.dim() else [int(aug.item())] * n
    elif isinstance(aug, (int, np.integer)):
        return [int(aug)] * n
    aug = [int(a) for a in aug]
    if len(aug) != n:
        raise DataError(f"batch['aug_index'] has {len(aug)} entries for {n} sample ids")
    return aug


def _batch_ids(batch: Mapping[str, Any]) -> list[str]:
    ids = batch.get("ids") if isinstance(batch, Mapping) else None
    if ids is None:
        keys = ", ".join(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise DataError(
            f"a teacher cache looks samples up by batch['ids'] (list of str sample ids); the batch has: {keys}"
        )
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [str(i) for i in ids]


def _sample_key(dataset: Any, index: int) -> str:
    """The data set's stable key of item `index` (`dataset.sample_key`), else the index as text."""
    fn = getattr(dataset, "sample_key", None)
    return str(fn(index)) if callable(fn) else str(index)


class _Positions(torch.utils.data.Dataset):
    """Items of `dataset` at `indices`, each as (index, item), so skipped (None) items keep their position."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, Any]:
        i = self.indices[j]
        return i, self.dataset[i]


class _CollateKept:
    """(indices of skipped items, batch of the others or None) from a list of (index, item)."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, pairs: Sequence[tuple[int, Any]]) -> tuple[list[int], Any]:
        kept = [item for _, item in pairs if item is not None]
        skipped = [i for i, item in pairs if item is None]
        return skipped, (self.collate(kept) if kept else None)


def _row_lengths(mask: torch.Tensor) -> np.ndarray:
    """Stored length per row: one past the last real position (so holes inside a sequence are kept)."""
    t = mask.shape[1]
    pos = torch.arange(1, t + 1, device=mask.device).expand_as(mask)
    return (pos * mask).amax(dim=1).cpu().numpy().astype(np.int32) if t else np.zeros(len(mask), np.int32)


def _flat_rows(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate x[i, :lengths[i]] over rows (x is [B, T, ...])."""
    keep = np.arange(x.shape[1])[None, :] < lengths[:, None]
    return x[keep]


# ---------------------------------------------------------------- shard buffer (write side)


class _ShardBuffer:
    """Accumulates one shard's teacher outputs as numpy arrays keyed by field name."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.keys: list[list[Any]] = []
        self.parts: dict[str, list[np.ndarray]] = {}

    def _float(self, name: str, t: torch.Tensor, ids: Sequence[str]) -> np.ndarray:
        a = t.detach().float().cpu().numpy()
        if not np.isfinite(a).all():
            bad = ids[int(np.argwhere(~np.isfinite(a).reshape(len(ids), -1).all(axis=1))[0, 0])]
            raise DataError(f"teacher output '{name}' is not finite for sample '{bad}'; check the teacher and data")
        if self.dtype == np.float16 and np.abs(a).max(initial=0.0) > FP16_MAX:
            row = int(np.argmax(np.abs(a).reshape(len(ids), -1).max(axis=1)))
            raise DataError(
                f"teacher output '{name}' of sample '{ids[row]}' exceeds the float16 range ({FP16_MAX:g}); "
                "build the cache with dtype float32"
            )
        return a.astype(self.dtype)

    def add(self, ids: Sequence[str], augs: Sequence[int], outputs: Mapping[str, Features]) -> None:
        n = len(ids)
        for modality, f in outputs.items():
            if not isinstance(f, Features):
                raise DataError(f"the teacher returned {type(f).__name__} for '{modality}', expected Features")
            if f.batch_size != n:
                raise DataError(f"the teacher returned {f.batch_size} rows for '{modality}' but the batch has {n} ids")
            put = lambda name, a: self.parts.setdefault(f"{modality}.{name}", []).append(a)  # noqa: B023
            put("pooled", self._float(f"{modality}.pooled", f.pooled, ids))
            if f.tokens is not None:
                lengths = _row_lengths(f.mask)
                put("tokens_len", lengths)
                put("tokens", _flat_rows(self._float(f"{modality}.tokens", f.tokens, ids), lengths))
                put("mask", _flat_rows(f.mask.cpu().numpy().astype(np.uint8), lengths))
            if f.logits is not None:
                logits = self._float(f"{modality}.logits", f.logits, ids)
                if logits.ndim == 3:
                    if f.tokens is not None and f.logits.shape[1] == f.tokens.shape[1]:
                        lengths = _row_lengths(f.mask)
                    else:
                        lengths = np.full(n, logits.shape[1], dtype=np.int32)
                    put("logits_len", lengths)
                    logits = _flat_rows(logits, lengths)
                put("logits", logits)
        self.keys.extend([i, int(a)] for i, a in zip(ids, augs))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts, axis=0) for name, parts in self.parts.items()}


def _schema(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, dict[str, Any]]:
    """Field name → kind (row = one entry per sample, flat = concatenated sequences), trailing shape, dtype."""
    out = {}
    for name, a in sorted(arrays.items()):
        if name.endswith("_len"):
            kind = "row"
        elif name.endswith((".tokens", ".mask")) or f"{name}_len" in arrays:
            kind = "flat"
        else:
            kind = "row"
        if kind == "row" and a.shape[0] != rows:
            raise DataError(f"cache field '{name}' has {a.shape[0]} rows, expected {rows}")
        out[name] = {"kind": kind, "shape": list(a.shape[1:]), "dtype": a.dtype.name}
    return out


# ---------------------------------------------------------------- build


def _read_manifest(path: Path) -> dict[str, Any] | None:
    mf = path / "manifest.json"
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mf}: unreadable teacher-cache manifest ({e}); delete the folder and rebuild") from e
    if manifest.get("format") != CACHE_FORMAT:
        raise CheckpointError(f"{mf} is not a teacher-cache manifest (format {manifest.get('format')!r})")
    if manifest.get("version") not in READ_VERSIONS:
        raise CheckpointError(
            f"{mf}: teacher-cache format version {manifest.get('version')}, this xmodal reads "
            f"{', '.join(map(str, READ_VERSIONS))}; rebuild the cache with `xmodal cache CONFIG`"
        )
    return manifest


def _shard_intact(root: Path, entry: Mapping[str, Any]) -> bool:
    folder = root / entry["name"]
    return all((folder / fn).is_file() and (folder / fn).stat().st_size == rec["bytes"]
               for fn, rec in entry["files"].items())


def build_cache(
    teacher: Callable[[Mapping[str, Any]], Mapping[str, Features]],
    dataset: Any,
    out_dir: str | os.PathLike,
    fingerprint: str,
    *,
    batch_size: int = 64,
    shard_size: int = 4096,
    dtype: Literal["float16", "float32"] = "float16",
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    meta: Mapping[str, Any] | None = None,
    data: DataIdentity | None = None,
    progress: bool = True,
) -> Path:
    """Run `teacher` over the map-style `dataset` in order and store its outputs; resumes an interrupted build.

    Shard k holds samples [k·shard_size, (k+1)·shard_size) less the ones the data set could not read (None items:
    their ids are recorded). Rebuilding into a folder made by another teacher, for other data or with another
    plan (data set size, shard size, dtype) is an error that says what differs. The folder is locked while it is
    built: a second builder is refused, naming the process that holds it.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    n = len(dataset)
    if n == 0:
        raise DataError("the data set to cache is empty")
    root = Path(out_dir)
    with locked(root, "teacher cache"):
        return _build(teacher, dataset, root, fingerprint, n, batch_size=batch_size, shard_size=shard_size,
                      dtype=dtype, collate_fn=collate_fn, num_workers=num_workers, device=device,
                      precision=precision, meta=meta, data=data, progress=progress)


def _data_record(fingerprint: str, data: DataIdentity | None) -> dict[str, Any] | None:
    """The manifest's data identity: the job's (with file paths), else the parts the fingerprint names."""
    if data is not None:
        return data.to_dict()
    parts = fingerprint_parts(fingerprint)[1]
    return None if parts is None else {"parts": parts, "files": {}}


def _build(teacher, dataset, root: Path, fingerprint: str, n: int, *, batch_size, shard_size, dtype, collate_fn,
           num_workers, device, precision, meta, data, progress) -> Path:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from xmodal.device import autocast, resolve_device
    from xmodal.engine.data import collate_samples, to_device

    plan = {"num_samples": n, "shard_size": int(shard_size), "dtype": dtype,
            "num_shards": math.ceil(n / shard_size)}
    manifest = _read_manifest(root)
    if manifest is not None:
        if manifest["fingerprint"] != fingerprint:
            why = describe_difference(manifest["fingerprint"], fingerprint) or (
                f"the teacher fingerprint differs ({manifest['fingerprint']} → {fingerprint})")
            raise CheckpointError(
                f"{root} holds a teacher cache that does not fit this one: {why}; "
                "choose another output folder or delete this one"
            )
        diffs = [f"{k}: {manifest['plan'].get(k)} → {v}" for k, v in plan.items() if manifest["plan"].get(k) != v]
        if diffs:
            raise CheckpointError(
                f"{root} holds a cache built with a different plan ({'; '.join(diffs)}); "
                "use the same settings to resume, or another output folder"
            )
        kept = [e for e in manifest["shards"] if _shard_intact(root, e)]
        for e in manifest["shards"]:
            if e not in kept:
                log.warning("%s: shard %s is damaged; it will be rebuilt", root, e["name"])
        manifest["shards"] = kept
        if manifest.get("complete") and len(kept) == plan["num_shards"]:
            log.info("%s: cache already complete (%d samples)", root, n)
            return root
    else:
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint, "plan": plan,
                    "data": _data_record(fingerprint, data), "meta": dict(meta or {}), "fields": None,
                    "shards": [], "complete": False}
    manifest["version"] = CACHE_VERSION
    manifest["complete"] = False
    done = {e["name"] for e in manifest["shards"]}
    for p in root.iterdir():  # leftovers of an interrupted shard write
        if p.is_dir() and (p.name.startswith(".shard_") or (p.name.startswith("shard_") and p.name not in done)):
            shutil.rmtree(p)
    atomic_write_json(root / "manifest.json", manifest)

    device = resolve_device(device)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval().requires_grad_(False).to(device)
    todo = [k for k in range(plan["num_shards"]) if _shard_name(k) not in done]
    if done:
        log.info("%s: resuming cache build, %d of %d shards already done", root, len(done), plan["num_shards"])
    seen = sum(e["rows"] + len(e.get("skipped", [])) for e in manifest["shards"])
    bar = tqdm(total=n, initial=seen, desc="teacher cache", unit="sample", disable=not progress or None,
               dynamic_ncols=True)
    np_dtype = np.dtype(DTYPES[dtype])
    for k in todo:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        loader = DataLoader(_Positions(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                            collate_fn=_CollateKept(collate_fn or collate_samples), num_workers=num_workers)
        buf = _ShardBuffer(np_dtype)
        skipped: list[str] = []
        for missing, batch in loader:
            skipped.extend(_sample_key(dataset, i) for i in missing)
            if batch is not None:
                ids = _batch_ids(batch)
                augs = _aug_list(batch.get("aug_index"), len(ids))
                with torch.inference_mode(), autocast(device, precision):
                    outputs = teacher(to_device(batch, device))
                buf.add(ids, augs, outputs)
            bar.update(len(missing) + (0 if batch is None else len(_batch_ids(batch))))
        if skipped:
            log.warning("%s: %d sample(s) of %s could not be read and are not cached (first: '%s')", root,
                        len(skipped), _shard_name(k), skipped[0])
        arrays = buf.arrays()
        rows = len(buf.keys)
        if rows + len(skipped) != hi - lo:
            raise DataError(
                f"{_shard_name(k)}: the data loader gave {rows} cached and {len(skipped)} skipped samples for "
                f"{hi - lo} positions; every item needs exactly one id"
            )
        if rows:
            schema = _schema(arrays, rows)
            if manifest["fields"] is None:
                manifest["fields"] = schema
            elif schema != manifest["fields"]:
                raise DataError(
                    f"teacher outputs of {_shard_name(k)} have fields {schema}, earlier shards had "
                    f"{manifest['fields']}; the teacher must return the same modalities and fields for every batch"
                )
        entry = _write_shard(root, k, buf.keys, arrays)
        entry["skipped"] = skipped
        manifest["shards"].append(entry)
        manifest["shards"].sort(key=lambda e: e["name"])
        atomic_write_json(root / "manifest.json", manifest)
    bar.close()
    if not any(e["rows"] for e in manifest["shards"]):
        raise DataError(f"none of the {n} samples could be read, so there is nothing to cache; check the data "
                        "set (on_error: raise shows why the first one fails)")
    _check_unique_keys(root, manifest)
    manifest["skipped"] = sorted(sid for e in manifest["shards"] for sid in e.get("skipped", []))
    manifest["complete"] = True
    atomic_write_json(root / "manifest.json", manifest)
    return root


def _write_shard(root: Path, k: int, keys: list[list[Any]], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write a shard into a temp folder, fsync, rename into place; return its manifest entry."""
    name = _shard_name(k)
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    ids_bytes = json.dumps(keys).encode()
    files["ids.json"] = _write_array(tmp / "ids.json", np.frombuffer(ids_bytes, dtype=np.uint8))
    for field_name, arr in arrays.items():
        files[f"{field_name}.bin"] = _write_array(tmp / f"{field_name}.bin", arr)
    _fsync_dir(tmp)
    os.replace(tmp, root / name)
    _fsync_dir(root)
    return {"name": name, "rows": len(keys), "files": files}


def _check_unique_keys(root: Path, manifest: Mapping[str, Any]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for e in manifest["shards"]:
        for sid, aug in json.loads((root / e["name"] / "ids.json").read_text()):
            key = (sid, aug)
            if key in seen:
                raise DataError(
                    f"sample id '{sid}' (augmentation {aug}) appears twice in the cached data set "
                    f"({seen[key]} and {e['name']}); sample ids must be unique"
                )
            seen[key] = e["name"]


# ---------------------------------------------------------------- read


class TeacherCache:
    """Read-only view of a finished cache; `cache(batch)` returns the teacher outputs for `batch["ids"]`.

    `fingerprint`: the current teacher's fingerprint; a cache of another teacher, or (when the fingerprint names
    its data) for other data, is refused. `data`: the current data identity, compared part by part. Either way,
    a cache whose recorded data files have changed since it was built is refused.
    `verify`: "full" checks sizes and checksums of every shard on open, "size" only exact sizes.
    """

    def __init__(self, path: str | os.PathLike, *, fingerprint: str | None = None,
                 verify: Literal["full", "size"] = "full", data: DataIdentity | None = None):
        self.path = Path(path)
        manifest = _read_manifest(self.path)
        if manifest is None:
            raise CheckpointError(
                f"{self.path} is not a teacher cache (no manifest.json); build it with `xmodal cache CONFIG`"
            )
        if not manifest.get("complete"):
            raise CheckpointError(
                f"teacher cache {self.path} is incomplete ({len(manifest['shards'])} of "
                f"{manifest['plan']['num_shards']} shards); run `xmodal cache` again to finish it"
            )
        if verify not in ("full", "size"):
            raise ConfigError(f"verify must be 'full' or 'size', got '{verify}'")
        self.data = DataIdentity.from_dict(manifest.get("data"))
        self._check_identity(manifest["fingerprint"], fingerprint, data)
        self.manifest = manifest
        self.fingerprint: str = fingerprint if fingerprint is not None else manifest["fingerprint"]
        self.skipped: set[str] = {sid for e in manifest["shards"] for sid in e.get("skipped", [])}
        self.fields: dict[str, dict[str, Any]] = manifest["fields"] or {}
        self.modalities = sorted({name.split(".", 1)[0] for name in self.fields})
        self._index: dict[tuple[str, int], int] = {}
        self._shard_of: list[np.ndarray] = []
        self._shards: list[dict[str, Any]] = []
        for s, entry in enumerate(manifest["shards"]):
            self._shards.append(self._open_shard(entry, verify))
            for r, (sid, aug) in enumerate(self._shards[-1]["keys"]):
                self._index[(sid, int(aug))] = (s << 40) | r

    def _check_identity(self, recorded: str, fingerprint: str | None, data: DataIdentity | None) -> None:
        """Refuse another teacher, other data, or data files changed since the build, saying what differs."""
        rebuild = "rebuild it with this teacher and data (`xmodal cache CONFIG`)"
        changed = self.data.changed_files() if self.data is not None else []
        why = describe_difference(recorded, fingerprint) if fingerprint is not None else None
        if changed:  # the most specific answer: name the edited files, and what else differs for this run
            also = f"; it does not fit this run: {why}" if why else ""
            raise CheckpointError(f"teacher cache {self.path} was built from data that changed since: "
                                  f"{'; '.join(changed)}{also}; {rebuild}")
        if why:
            raise CheckpointError(f"teacher cache {self.path} does not fit this run: {why}; {rebuild}")
        if data is not None:
            if self.data is None:
                raise CheckpointError(f"teacher cache {self.path} records no data identity (made by an older "
                                      f"xmodal), so it cannot show it holds this data; {rebuild}")
            names = self.data.differences(data)
            if names:
                raise CheckpointError(f"teacher cache {self.path} was built for other data ({', '.join(names)} "
                                      f"differ); {rebuild}")

    def _open_shard(self, entry: Mapping[str, Any], verify: str) -> dict[str, Any]:
        folder = self.path / entry["name"]
        for fn, rec in entry["files"].items():
            p = folder / fn
            if not p.is_file():
                raise CheckpointError(f"teacher cache {self.path}: shard {entry['name']} is missing file {fn}")
            size = p.stat().st_size
            if size != rec["bytes"]:
                raise CheckpointError(
                    f"teacher cache {self.path}: shard {entry['name']} is truncated or damaged: {fn} has {size} "
                    f"bytes, the manifest records {rec['bytes']}; rebuild it (delete the shard folder and its "
                    "manifest entry, or the whole cache, and run `xmodal cache` again)"
                )
            if verify == "full" and _file_digest(p) != rec["blake2b"]:
                raise CheckpointError(
                    f"teacher cache {self.path}: shard {entry['name']} is corrupt: checksum of {fn} does not match "
                    "the manifest; rebuild the cache (`xmodal cache` on a fresh folder)"
                )
        rows = int(entry["rows"])
        shard: dict[str, Any] = {"keys": json.loads((folder / "ids.json").read_text()), "rows": rows}
        if rows == 0:  # every sample of this shard was skipped: ids only
            return shard
        for name, spec in self.fields.items():
            shape = tuple(spec["shape"])
            nbytes = entry["files"][f"{name}.bin"]["bytes"]
            item = np.dtype(spec["dtype"]).itemsize * int(np.prod(shape, dtype=np.int64))
            count = nbytes // item if item else 0
            if spec["kind"] == "row" and count != rows:
                raise CheckpointError(
                    f"teacher cache {self.path}: shard {entry['name']} field {name} has {count} rows, expected {rows}"
                )
            if name.endswith("_len"):  # small: keep in memory with offsets
                lengths = np.fromfile(folder / f"{name}.bin", dtype=spec["dtype"]).astype(np.int64)
                shard[name] = lengths
                shard[name + ".offsets"] = np.concatenate([[0], np.cumsum(lengths)])
            elif count == 0:
                shard[name] = np.zeros((0, *shape), dtype=spec["dtype"])
            else:
                shard[name] = np.memmap(folder / f"{name}.bin", dtype=spec["dtype"], mode="r", shape=(count, *shape))
        for name in self.fields:
            if name.endswith("_len"):
                total = int(shard[name + ".offsets"][-1])
                base = name[: -len("_len")]
                for flat in ([base] if base.endswith(".logits") else [base, base[: -len("tokens")] + "mask"]):
                    if flat in self.fields and shard[flat].shape[0] != total:
                        raise CheckpointError(
                            f"teacher cache {self.path}: shard {entry['name']} field {flat} holds "
                            f"{shard[flat].shape[0]} positions, its lengths sum to {total}"
                        )
        return shard

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str | tuple[str, int]) -> bool:
        return (key if isinstance(key, tuple) else (key, 0)) in self._index

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        return self.lookup(_batch_ids(batch), batch.get("aug_index"))

    def _rows(self, ids: Sequence[str], aug_index: Any) -> np.ndarray:
        augs = _aug_list(aug_index, len(ids))
        try:
            return np.fromiter((self._index[(i, a)] for i, a in zip(ids, augs)), dtype=np.int64, count=len(ids))
        except KeyError:
            for i, a in zip(ids, augs):
                if (i, a) not in self._index:
                    raise self._missing(i, a) from None
            raise

    def _missing(self, sid: str, aug: int) -> DataError:
        if sid in self.skipped:
            return DataError(
                f"sample id '{sid}' (augmentation {aug}) was skipped when teacher cache {self.path} was built: its "
                "input could not be read, so the cache holds no teacher outputs for it. Fix or remove the sample "
                "and rebuild the cache (`xmodal cache CONFIG`)"
            )
        return DataError(
            f"sample id '{sid}' (augmentation {aug}) is not in teacher cache {self.path}, and was not skipped when "
            "it was built: the cache holds another data set; rebuild the cache for this data set"
        )

    def lookup(self, ids: Sequence[str], aug_index: Any = None) -> dict[str, Features]:
        """Teacher outputs (float32 CPU tensors) for these sample ids, in order; sequences padded to the batch max."""
        keys = self._rows(ids, aug_index)
        shard_ids, local = keys >> 40, keys & ((1 << 40) - 1)
        order = np.argsort(shard_ids, kind="stable")
        groups = [(int(s), local[order][shard_ids[order] == s]) for s in np.unique(shard_ids)]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))

        def rows(name: str) -> np.ndarray:
            parts = [self._shards[s][name][r] for s, r in groups]
            return (parts[0] if len(parts) == 1 else np.concatenate(parts))[inverse]

        def seqs(base: str, fields: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
            """Per-row lengths and each field padded to [B, Tmax, ...] (original row order)."""
            lens_parts, flat_parts = [], [[] for _ in fields]
            for s, r in groups:
                shard = self._shards[s]
                lens = shard[base + "_len"][r]
                starts = shard[base + "_len.offsets"][r]
                idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
                lens_parts.append(lens)
                for j, f in enumerate(fields):
                    flat_parts[j].append(shard[f][idx])
            lens = np.concatenate(lens_parts)
            tmax = int(lens.max(initial=0))
            keep = np.arange(tmax)[None, :] < lens[:, None]
            out = []
            for j in range(len(fields)):
                flat = np.concatenate(flat_parts[j]) if len(flat_parts[j]) > 1 else flat_parts[j][0]
                padded = np.zeros((len(lens), tmax, *flat.shape[1:]), dtype=flat.dtype)
                padded[keep] = flat
                out.append(padded[inverse])
            return lens[inverse], out

        result = {}
        for m in self.modalities:
            pooled = torch.from_numpy(rows(f"{m}.pooled").astype(np.float32))
            tokens = mask = logits = None
            if f"{m}.tokens" in self.fields:
                _, (tok, msk) = seqs(f"{m}.tokens", [f"{m}.tokens", f"{m}.mask"])
                tokens = torch.from_numpy(tok.astype(np.float32))
                mask = torch.from_numpy(msk.astype(bool))
            if f"{m}.logits_len" in self.fields:
                lens, (lg,) = seqs(f"{m}.logits", [f"{m}.logits"])
                if tokens is None and len(lens) and (lens != lens[0]).any():
                    raise DataError(
                        f"teacher cache {self.path}: per-step '{m}' logits of these samples have different lengths "
                        f"({sorted(set(lens.tolist()))}) and no token mask to mark the padding"
                    )
                logits = torch.from_numpy(lg.astype(np.float32))
            elif f"{m}.logits" in self.fields:
                logits = torch.from_numpy(rows(f"{m}.logits").astype(np.float32))
            result[m] = Features(pooled=pooled, tokens=tokens, mask=mask, logits=logits)
        return result


def open_cache(path: str | os.PathLike | TeacherCache, fingerprint: str | None = None,
               verify: Literal["full", "size"] = "full", data: DataIdentity | None = None) -> TeacherCache:
    if isinstance(path, TeacherCache):
        return path
    return TeacherCache(path, fingerprint=fingerprint, verify=verify, data=data)


def cache_items(cache: TeacherCache) -> Iterable[tuple[str, int]]:
    """Every (sample id, augmentation index) in the cache, in storage order."""
    for shard in cache._shards:
        for sid, aug in shard["keys"]:
            yield sid, int(aug)

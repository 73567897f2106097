"""Teacher cache: run the teacher once, store its outputs in sharded memory-mapped files, read them per batch.

Layout of a cache folder:

    manifest.json            format, teacher fingerprint, data identity, plan, field schema, finished shards
                             (sizes, blake2b, ids of skipped samples)
    shard_00000/ids.json     [[sample id, augmentation index], ...] in row order
    shard_00000/<m>.<f>.bin  raw little-endian arrays, one per field
    .lock                    held by the process building the cache (`xmodal.lock`): one builder per folder
    manifest.rank{r}.json    while a multi-process build runs: the shards rank r finished (merged by rank 0)

Fields per modality `m`: `pooled` [rows, D]; 2-D `logits` [rows, C]; token fields stored flat without padding:
`tokens` [Σlen, Dt] and `mask` [Σlen] (uint8) with `tokens_len` [rows] (int32); 3-D `logits` [Σlen, C] with
`logits_len`. Reading gathers rows with numpy fancy indexing on the memmaps and pads to the batch maximum.

A shard folder is written under a temp name and renamed, then the manifest (written atomically) records it:
an interrupted build resumes at the first unrecorded shard. Opening checks every file's exact size (truncation)
and, with `verify="full"`, its blake2b checksum (corruption), naming the shard at fault.

Multi-process builds (torchrun, or any joined process group): the plan (shards of fixed index ranges) does not
depend on the number of processes. Rank 0 holds the folder lock, checks the folder and folds in rank records of
an interrupted build; every rank then builds a disjoint share of the unfinished shards (`todo[rank::world]`) and
records them in its own rank record; after a barrier rank 0 merges the records into `manifest.json`. So the
finished cache is the one a single process builds, and a stopped build resumes with any number of processes.

Augmentation-aware caches: with a view recipe (`views`, kept in the plan), each row is one (sample id, view) and
also stores the view's parameters (`view_params` [rows, P], float32); `TeacherCache.view_params` reads them back
so training can re-render exactly the view the teacher saw. The manifest's `storage` gives bytes per row.

Identity: the fingerprint (`xmodal.fingerprint`) covers the teacher and, from the jobs, the data (content hash of
the data file, media file states, vocabulary ...). The manifest records the data identity; opening a cache whose
data files changed since, or for a fingerprint with other data, is refused with what differs. Rows are keyed by
sample id (the data set's stable `sample_key`), never by row position. A sample the data set cannot read (it
returns None, as with `on_error: skip`) is left out and its id recorded, so a lookup of it says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
VIEW_PARAMS = "view_params"  # per-row parameters of a recorded augmented view (a row field, not a modality)


# ---------------------------------------------------------------- job protocol


@dataclass
class CacheSource:
    """What `xmodal cache` needs from a job: the frozen teacher, the data set to run it on, its fingerprint.

    `dataset` items are dicts with an `id` (str) and optionally an `aug_index` (int), or None for a sample that
    cannot be read (skipped and recorded; `dataset.sample_key(index)` names it); batches collated by
    `collate_fn` (default: `collate_samples`) must carry `ids` and optionally `aug_index`. `fingerprint` is
    `xmodal.fingerprint.fingerprint(teacher, preprocessing, data=data)` and `data` the data identity in it.
    With `views`, items also carry `view_params` (the recorded parameters of view `aug_index`).
    """

    teacher: Callable[[Mapping[str, Any]], Mapping[str, Features]]
    dataset: Any
    fingerprint: str
    collate_fn: Callable | None = None
    batch_size: int = 64
    out_dir: str | os.PathLike | None = None
    meta: dict | None = None
    data: DataIdentity | None = None
    views: dict | None = None  # the view recipe of an augmentation-aware cache (see `build_cache`)


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

    def add(self, ids: Sequence[str], augs: Sequence[int], outputs: Mapping[str, Features],
            view_params: np.ndarray | None = None) -> None:
        n = len(ids)
        if view_params is not None:  # stored as given (float32), never rounded to the output dtype
            self.parts.setdefault(VIEW_PARAMS, []).append(np.asarray(view_params, dtype=np.float32))
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
    views: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Run `teacher` over the map-style `dataset` and store its outputs; resumes an interrupted build.

    Shard k holds samples [k·shard_size, (k+1)·shard_size) less the ones the data set could not read (None items:
    their ids are recorded). Rebuilding into a folder made by another teacher, for other data or with another
    plan (data set size, shard size, dtype, view recipe) is an error that says what differs. The folder is locked
    while it is built: a second builder is refused, naming the process that holds it.

    Under torchrun (or in any joined process group) every rank builds its share of the unfinished shards, records
    them in its own `manifest.rank{r}.json`, and rank 0 merges them into `manifest.json` after a barrier; the
    result is the cache one process would build. `views`: the recipe of an augmentation-aware cache (view count,
    parameter names, ...), kept in the plan; batches then carry `aug_index` and `view_params` [B, P].
    """
    if dtype not in DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    n = len(dataset)
    if n == 0:
        raise DataError("the data set to cache is empty")
    root = Path(out_dir)
    from xmodal.distributed import is_distributed, rank, world_size
    from xmodal.engine.ddp import env_world_size, init_distributed

    if env_world_size() > 1 or is_distributed():
        device = init_distributed(device)  # joins the torchrun group; cuda:LOCAL_RANK on GPUs
    kw = dict(batch_size=batch_size, shard_size=shard_size, dtype=dtype, collate_fn=collate_fn,
              num_workers=num_workers, device=device, precision=precision, meta=meta, data=data,
              views=None if views is None else dict(views), progress=progress)
    if world_size() == 1:
        with locked(root, "teacher cache"):
            return _build(teacher, dataset, root, fingerprint, n, **kw)
    with _group_lock(root, rank()):
        return _build(teacher, dataset, root, fingerprint, n, rank=rank(), world=world_size(), **kw)


@contextlib.contextmanager
def _group_lock(root: Path, r: int) -> Iterator[None]:
    """Rank 0 holds the folder lock for the whole group; when it cannot, every rank is refused the same way."""
    from xmodal.lock import FolderLock, LockedError

    lock = FolderLock(root, "teacher cache")
    refused = None
    if r == 0:
        try:
            lock.acquire()
        except LockedError as e:
            refused = (str(e), e.holder)
    refused = _broadcast(refused)
    if refused is not None:
        raise LockedError(*refused)
    try:
        yield
    finally:
        lock.release()


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable value)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn: Callable[[], Any], r: int, world: int) -> Any:
    """Run `fn` on rank 0 only and give every rank its result, or raise its error on every rank (so no rank waits
    in a collective for a rank that failed)."""
    if world == 1:
        return fn()
    result: tuple[str, Any] | None = None
    if r == 0:
        try:
            result = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            result = ("error", e)
            try:
                pickle.loads(pickle.dumps(e))
            except Exception:  # noqa: BLE001 - an exception type that does not survive pickling
                result = ("error", CheckpointError(f"{type(e).__name__}: {e}"))
    status, value = _broadcast(result)
    if status == "error":
        if r == 0:
            raise value
        raise type(value)(*value.args) from None
    return value


def _data_record(fingerprint: str, data: DataIdentity | None) -> dict[str, Any] | None:
    """The manifest's data identity: the job's (with file paths), else the parts the fingerprint names."""
    if data is not None:
        return data.to_dict()
    parts = fingerprint_parts(fingerprint)[1]
    return None if parts is None else {"parts": parts, "files": {}}


def _rank_record_path(root: Path, r: int) -> Path:
    return root / f"manifest.rank{r}.json"


def _rank_records(root: Path) -> list[Path]:
    """Rank-local records left in `root` (by this build or by an interrupted one, of any world size)."""
    return sorted(root.glob("manifest.rank*.json"), key=lambda p: p.name)


def _merge_rank_records(root: Path, manifest: dict[str, Any]) -> None:
    """Fold every rank record's finished, intact shards into `manifest` (in place); damaged ones are dropped."""
    have = {e["name"] for e in manifest["shards"]}
    for p in _rank_records(root):
        try:
            part = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: unreadable rank record of a teacher-cache build ({e}); delete it (its "
                                  "shards will be rebuilt) and run `xmodal cache` again") from e
        if part.get("fingerprint") != manifest["fingerprint"] or part.get("plan") != manifest["plan"]:
            raise CheckpointError(f"{p} records shards of another build than {root / 'manifest.json'} (fingerprint "
                                  "or plan differ); delete it (its shards will be rebuilt) or use another folder")
        if part.get("fields") is not None:
            if manifest["fields"] is None:
                manifest["fields"] = part["fields"]
            elif part["fields"] != manifest["fields"]:
                raise DataError(f"{p}: teacher outputs of rank {part.get('rank')} have fields {part['fields']}, "
                                f"other ranks had {manifest['fields']}; the teacher must return the same modalities "
                                "and fields for every batch")
        for e in part["shards"]:
            if e["name"] in have:
                continue
            if _shard_intact(root, e):
                manifest["shards"].append(e)
                have.add(e["name"])
            else:
                log.warning("%s: shard %s is damaged; it will be rebuilt", root, e["name"])
    manifest["shards"].sort(key=lambda e: e["name"])


def _prepare(root: Path, fingerprint: str, plan: dict[str, Any], meta, data, world: int) -> dict[str, Any]:
    """Check a folder's earlier build against this one, fold in rank records, clear leftovers; the manifest."""
    manifest = _read_manifest(root)
    if manifest is not None:
        if manifest["fingerprint"] != fingerprint:
            why = describe_difference(manifest["fingerprint"], fingerprint) or (
                f"the teacher fingerprint differs ({manifest['fingerprint']} → {fingerprint})")
            raise CheckpointError(
                f"{root} holds a teacher cache that does not fit this one: {why}; "
                "choose another output folder or delete this one"
            )
        keys = sorted(set(plan) | set(manifest["plan"]))
        diffs = [f"{k}: {manifest['plan'].get(k)} → {plan.get(k)}" for k in keys
                 if manifest["plan"].get(k) != plan.get(k)]
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
        _merge_rank_records(root, manifest)
        if manifest.get("complete") and len(kept) == plan["num_shards"]:
            log.info("%s: cache already complete (%d samples)", root, plan["num_samples"])
            return manifest
    else:
        manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint, "plan": plan,
                    "data": _data_record(fingerprint, data), "meta": dict(meta or {}), "fields": None,
                    "shards": [], "complete": False}
    manifest["version"] = CACHE_VERSION
    manifest["complete"] = False
    manifest["build"] = {"processes": world}
    done = {e["name"] for e in manifest["shards"]}
    for p in root.iterdir():  # leftovers of an interrupted shard write
        if p.is_dir() and (p.name.startswith(".shard_") or (p.name.startswith("shard_") and p.name not in done)):
            shutil.rmtree(p)
    atomic_write_json(root / "manifest.json", manifest)
    for p in _rank_records(root):  # folded into the manifest, which is written first
        p.unlink()
    return manifest


def _finish(root: Path, manifest: dict[str, Any], n: int, seconds: float) -> dict[str, Any]:
    """Fold the ranks' records in, check the whole, mark the manifest complete with its storage report and the
    build's wall time (of this session, when it resumed an earlier one)."""
    _merge_rank_records(root, manifest)
    missing = manifest["plan"]["num_shards"] - len(manifest["shards"])
    if missing:
        raise CheckpointError(f"{root}: {missing} shard(s) of the plan are not recorded after every rank finished; "
                              "run `xmodal cache` again to build them")
    if not any(e["rows"] for e in manifest["shards"]):
        raise DataError(f"none of the {n} samples could be read, so there is nothing to cache; check the data "
                        "set (on_error: raise shows why the first one fails)")
    _check_unique_keys(root, manifest)
    manifest["skipped"] = sorted({sid for e in manifest["shards"] for sid in e.get("skipped", [])})
    manifest["storage"] = storage_report(manifest)
    manifest["build"] = {**manifest.get("build", {}), "seconds": round(seconds, 3)}
    manifest["complete"] = True
    atomic_write_json(root / "manifest.json", manifest)
    for p in _rank_records(root):
        p.unlink()
    return manifest


def storage_report(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Bytes on disk per cached row (one sample, one view) and per sample, in total and per field."""
    rows = sum(int(e["rows"]) for e in manifest["shards"])
    views = int((manifest["plan"].get("views") or {}).get("count", 1))
    per_file: dict[str, int] = {}
    for e in manifest["shards"]:
        for fn, rec in e["files"].items():
            per_file[fn] = per_file.get(fn, 0) + int(rec["bytes"])
    total = sum(per_file.values())
    per_row = total / rows if rows else 0.0
    return {"rows": rows, "views": views, "bytes": total,
            "bytes_per_sample_per_view": round(per_row, 2), "bytes_per_sample": round(per_row * views, 2),
            "bytes_per_row_by_file": {fn: round(b / rows, 2) if rows else 0.0 for fn, b in sorted(per_file.items())}}


def _build(teacher, dataset, root: Path, fingerprint: str, n: int, *, batch_size, shard_size, dtype, collate_fn,
           num_workers, device, precision, meta, data, views, progress, rank: int = 0, world: int = 1) -> Path:
    from torch.utils.data import DataLoader

    from xmodal.device import autocast, resolve_device
    from xmodal.engine.data import collate_samples, to_device
    from xmodal.progress import progress as progress_bar

    plan = {"num_samples": n, "shard_size": int(shard_size), "dtype": dtype,
            "num_shards": math.ceil(n / shard_size)}
    if views is not None:
        plan["views"] = views
    started = time.perf_counter()
    if world > 1:
        _check_ranks_agree(fingerprint, plan, rank)
    manifest = _on_rank0(lambda: _prepare(root, fingerprint, plan, meta, data, world), rank, world)
    if manifest.get("complete"):
        return root

    device = resolve_device(device)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval().requires_grad_(False).to(device)
    done = {e["name"] for e in manifest["shards"]}
    todo = [k for k in range(plan["num_shards"]) if _shard_name(k) not in done]
    mine = todo[rank::world]  # a deterministic, disjoint share of the unfinished shards
    if done and rank == 0:
        log.info("%s: resuming cache build, %d of %d shards already done", root, len(done), plan["num_shards"])
    if world == 1:
        record, record_path = manifest, root / "manifest.json"
    else:  # each rank records its own shards; rank 0 merges the records at the end
        record = {"format": CACHE_FORMAT + "-rank", "fingerprint": fingerprint, "plan": plan, "rank": rank,
                  "processes": world, "fields": manifest["fields"], "shards": []}
        record_path = _rank_record_path(root, rank)
    total = sum(min(n, (k + 1) * shard_size) - k * shard_size for k in mine)
    what = "teacher cache" if world == 1 else f"teacher cache (rank {rank} of {world})"
    bar = progress_bar(total=total if world > 1 else n, initial=0 if world > 1 else n - total, desc=what,
                        unit="sample", enabled=progress and rank == 0)
    np_dtype = np.dtype(DTYPES[dtype])
    for k in mine:
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
                params = _view_params(batch, len(ids), views)
                with torch.inference_mode(), autocast(device, precision):
                    outputs = teacher(to_device(batch, device))
                buf.add(ids, augs, outputs, params)
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
            if record["fields"] is None:
                record["fields"] = schema
            elif schema != record["fields"]:
                raise DataError(
                    f"teacher outputs of {_shard_name(k)} have fields {schema}, earlier shards had "
                    f"{record['fields']}; the teacher must return the same modalities and fields for every batch"
                )
        entry = _write_shard(root, k, buf.keys, arrays)
        entry["skipped"] = skipped
        record["shards"].append(entry)
        record["shards"].sort(key=lambda e: e["name"])
        atomic_write_json(record_path, record)
    bar.close()
    if world > 1:
        from xmodal.engine.ddp import barrier

        barrier()  # every rank's shards are written and recorded
    _on_rank0(lambda: _finish(root, manifest, n, time.perf_counter() - started), rank, world)
    return root


def _check_ranks_agree(fingerprint: str, plan: Mapping[str, Any], rank: int) -> None:
    """Every rank must cache the same teacher over the same data with the same plan, or the shards would mix."""
    from xmodal.engine.ddp import gather_objects

    seen = gather_objects((fingerprint, dict(plan)))
    for r, (fp, pl) in enumerate(seen):
        if fp != seen[0][0]:
            why = describe_difference(seen[0][0], fp) or f"{seen[0][0]} on rank 0, {fp} on rank {r}"
            raise CheckpointError(
                f"the processes of this cache build have different teachers or data (rank {r} vs rank 0: {why}); "
                "every rank must load the same teacher weights (a randomly initialised teacher differs per process "
                "unless seeded) and read the same data")
        if pl != seen[0][1]:
            raise CheckpointError(f"the processes of this cache build plan differently (rank {r}: {pl}; rank 0: "
                                  f"{seen[0][1]}); give every rank the same data set and settings")


def _view_params(batch: Mapping[str, Any], n: int, views: Mapping[str, Any] | None) -> np.ndarray | None:
    """The batch's recorded view parameters [n, P] (float32), required exactly when the build has a view recipe."""
    params = batch.get(VIEW_PARAMS) if isinstance(batch, Mapping) else None
    if views is None:
        if params is not None:
            raise DataError(f"batches carry '{VIEW_PARAMS}' but the cache has no view recipe; pass views= to "
                            "build_cache (the job's view settings) so the parameters are stored and checked")
        return None
    if params is None:
        raise DataError(f"an augmentation-aware cache stores each view's parameters: batches need "
                        f"batch['{VIEW_PARAMS}'] [B, {len(views.get('params', [])) or 'P'}] next to 'aug_index'")
    a = (params.detach().cpu().numpy() if isinstance(params, torch.Tensor) else np.asarray(params))
    a = a.astype(np.float32).reshape(n, -1)
    names = views.get("params")
    if names is not None and a.shape[1] != len(names):
        raise DataError(f"batch['{VIEW_PARAMS}'] has {a.shape[1]} columns, the view recipe names {len(names)} "
                        f"({', '.join(names)})")
    return a


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
        self.modalities = sorted({name.split(".", 1)[0] for name in self.fields if name != VIEW_PARAMS})
        self.views: dict[str, Any] | None = manifest["plan"].get("views")
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

    def view_params(self, ids: Sequence[str], aug_index: Any = None) -> np.ndarray:
        """The recorded parameters [len(ids), P] (float32) of these samples' views, as the build stored them."""
        if VIEW_PARAMS not in self.fields:
            raise DataError(f"teacher cache {self.path} records no view parameters: it was built without "
                            "augmented views; rebuild it with the job's view setting to replay views")
        keys = self._rows(ids, aug_index)
        shard_ids, local = keys >> 40, keys & ((1 << 40) - 1)
        return np.stack([np.asarray(self._shards[int(s)][VIEW_PARAMS][int(r)], dtype=np.float32)
                         for s, r in zip(shard_ids, local)]) if len(ids) else np.zeros((0, 0), np.float32)


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

"""Batches for the engine: a resumable, rank-aware batch sampler, the epoch-aware data contract, a dict collate and
device moves.

The sampler thinks in global batches: epoch e shuffles all indices with seed `seed + e`, global batch k takes
the next `global_batch` of them, and rank r gets the r-th contiguous slice. So N processes see exactly the
batches one process would (in rank order), and a resume jumps straight to (epoch, batch) without loading data.

The data contract for a map-style data set the engine loads:

- Randomness (caption choice, crops, flips, masks) is a pure function of (seed, sample key, epoch):
  `sample_seed` makes that seed and `seeded_rngs` runs a transform that draws from the global RNGs under it.
- `set_epoch(epoch)`, when defined, is called with the epoch of every item in the process that loads it (the
  sampler hands out (index, epoch) pairs to an `EpochView`), so persistent DataLoader workers see every epoch
  and a resume restores it with the data position.
- `sample_key(index) -> str`, when defined, names a sample without loading it (its id or path); items carry the
  same key as `id`. Caches and the skipped-sample list are keyed by it, never by row position.
- `__getitem__` may return None for a sample it cannot read: the engine replaces it by another sample chosen
  from (seed, index, epoch), so every batch, on every rank, has its full size; skipped keys are counted
  (`BatchStream.skipped_keys`) and kept in the data state of checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from xmodal.errors import ConfigError, DataError
from xmodal.features import Features

log = logging.getLogger(__name__)


_END = object()
MAX_REPLACEMENT_TRIES = 64  # unreadable candidates in a row before a skipped sample is an error


# ---------------------------------------------------------------- per-sample randomness


def _key_words(key: Any) -> list[int]:
    """A sample key (any str()-able value) as four 32-bit words of its blake2b digest."""
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=16).digest()
    return np.frombuffer(digest, dtype="<u4").tolist()


def sample_seed(seed: int, key: Any, epoch: int) -> int:
    """A 63-bit seed that depends only on (seed, sample key, epoch): the seed of one sample's randomness."""
    entropy = [int(seed) % 2**64, *_key_words(key), int(epoch) % 2**64]
    lo, hi = np.random.SeedSequence(entropy).generate_state(2, np.uint32).tolist()
    return ((hi << 32) | lo) & (2**63 - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch (CPU) RNGs seeded by `seed`, then put the previous states back.

    For transforms that draw from the global RNGs (torchvision, open_clip, timm): their draws then depend on the
    seed alone, not on which worker ran them or what it ran before. CUDA generators are left alone, so this is
    safe in forked DataLoader workers.
    """
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # the CPU generator only: torch.manual_seed would also (lazily) seed every CUDA/XPU/MTIA generator, which
        # fork_rng(devices=[]) does not restore, and records a stack trace for each call (half a sample's cost)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def sample_key(data: Any, index: int) -> str:
    """The data set's stable key of item `index` (`data.sample_key`), else the index as text."""
    fn = getattr(data, "sample_key", None)
    return str(fn(index)) if callable(fn) else str(index)


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch RNGs seeded by `seed`, then put the previous states back."""
    from xmodal.engine.checkpoint import capture_rng, restore_rng

    saved = capture_rng()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        restore_rng(saved)


class ResumableBatchSampler:
    """Per-rank index batches of a seeded per-epoch permutation, startable at any (epoch, batch)."""

    def __init__(self, num_samples: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise ConfigError(
                f"train.batch_size {global_batch} must be divisible by the number of processes {world_size}"
            )
        if num_samples < global_batch:
            raise DataError(
                f"the data set has {num_samples} samples, fewer than one global batch of {global_batch}; "
                "lower train.batch_size or add data"
            )
        self.num_samples, self.global_batch = int(num_samples), int(global_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch = self.global_batch // self.world_size
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        """Global batches per epoch (the incomplete last batch is dropped)."""
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Next iteration yields epoch `epoch` from its batch `start` on."""
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        lo = self.rank * self.local_batch
        for k in range(self.start, len(self)):
            chunk = order[k * self.global_batch + lo: k * self.global_batch + lo + self.local_batch]
            yield chunk.tolist()


class EpochBatches:
    """A batch sampler's index batches as (index, epoch) pairs, so the loading process learns each item's epoch."""

    def __init__(self, sampler: ResumableBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(i, epoch) for i in batch]


class EpochView(Dataset):
    """The engine's view of a map-style data set: items addressed by (index, epoch), skipped ones replaced.

    In whichever process loads the item (main or a persistent worker) it calls `data.set_epoch(epoch)` first.
    An item that comes back None is replaced by another one drawn from (seed, index, epoch); the view returns
    `(item, keys of the samples skipped on the way)` for `EpochCollate` to separate.
    """

    def __init__(self, data: Dataset, seed: int = 0, max_tries: int = MAX_REPLACEMENT_TRIES):
        self.data, self.seed, self.max_tries = data, int(seed), int(max_tries)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, where: tuple[int, int]) -> tuple[Any, list[str]]:
        index, epoch = where
        set_epoch = getattr(self.data, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        item = self.data[index]
        skipped: list[str] = []
        if item is not None:
            return item, skipped
        rng = np.random.default_rng([self.seed % 2**64, int(index), int(epoch), 0x5EED])
        candidate = index
        while item is None:
            skipped.append(sample_key(self.data, candidate))
            if len(skipped) > self.max_tries:
                raise DataError(
                    f"more than {self.max_tries} samples in a row could not be read while replacing the unreadable "
                    f"sample {skipped[0]!r} (last: {skipped[-1]!r}); check the data set (on_error: raise shows why)"
                )
            candidate = int(rng.integers(len(self.data)))
            item = self.data[candidate]
        return item, skipped


class EpochCollate:
    """Collate `EpochView` outputs: (the data set's collate of the items, keys skipped in this batch)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, samples: Sequence[tuple[Any, list[str]]]) -> tuple[Any, list[str]]:
        return self.collate_fn([s for s, _ in samples]), [k for _, keys in samples for k in keys]


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """torch's default_collate on dict samples, with a sample's `id` collected as the batch's `ids` list."""
    batch = default_collate(list(samples))
    if "id" in batch and "ids" not in batch:
        ids = batch.pop("id")
        batch["ids"] = [str(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    return batch


def to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move every tensor (and Features) inside dicts, lists and tuples to `device`; other leaves pass through."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking and device.type == "cuda")
    if isinstance(obj, Features):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def is_map_dataset(data: Any) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__") \
        and not isinstance(data, DataLoader)


class BatchStream:
    """Endless batches with a known position (epoch, batch in epoch) that a checkpoint can restore.

    Over a map-style data set the engine owns the loader and sampler, so restoring is exact and free, every
    loading process learns the epoch (`EpochView`), and unreadable samples are replaced and their keys collected
    in `skipped_keys`. Over any other iterable (a DataLoader a job built) the epoch is re-iterated and `offset`
    batches are skipped; its data set's `set_epoch` is called in this process only (so not in persistent workers).
    A loader with `seek(epoch, offset)` is told where to start instead (nothing is skipped here), and one with
    `reports_skipped = True` yields `(batch, skipped keys)` pairs, whose keys join `skipped_keys`.
    """

    def __init__(self, data: Dataset | Iterable, *, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, collate_fn=None, num_workers: int = 0, pin_memory: bool = False):
        self.epoch, self.offset = 0, 0
        self.seed = seed
        self._iter: Iterator | None = None
        self._pending: Any = None
        self.sampler: ResumableBatchSampler | None = None
        self.skipped_keys: list[str] = []  # distinct keys of samples replaced because they could not be read
        self._skipped: set[str] = set()
        if is_map_dataset(data):
            self.sampler = ResumableBatchSampler(len(data), global_batch, rank=rank, world_size=world_size,
                                                 seed=seed)
            self.generator = torch.Generator()
            self.loader: Iterable = DataLoader(
                EpochView(data, seed), batch_sampler=EpochBatches(self.sampler),
                collate_fn=EpochCollate(collate_fn or collate_samples), num_workers=num_workers,
                pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=self.generator,
            )
        else:
            self.loader = data
        # a stream loader (e.g. xmodal.data.shards.ShardLoader) may yield (batch, skipped keys) pairs
        self._reports_skipped = self.sampler is None and bool(getattr(data, "reports_skipped", False))

    @property
    def samples_per_batch(self) -> int | None:
        return self.sampler.global_batch if self.sampler else None

    @property
    def skipped_samples(self) -> int:
        """How many distinct samples this process replaced so far (see `gather_skipped_keys` for all ranks)."""
        return len(self.skipped_keys)

    def gather_skipped_keys(self) -> list[str]:
        """Distinct skipped keys over all processes (a collective under DDP: call it on every rank)."""
        from xmodal.engine.ddp import gather_objects

        out: dict[str, None] = {}
        for keys in gather_objects(list(self.skipped_keys)):
            out.update(dict.fromkeys(keys))
        return list(out)

    def _record_skipped(self, keys: Iterable[str], quiet: bool = False) -> None:
        for key in keys:
            if key not in self._skipped:
                self._skipped.add(key)
                self.skipped_keys.append(key)
                if not quiet:
                    log.warning("sample %r could not be read; replaced by another sample (epoch %d)", key,
                                self.epoch)

    def state(self) -> dict[str, Any]:
        """Data position and skipped keys: what a checkpoint stores to resume exactly here."""
        return {"epoch": self.epoch, "offset": self.offset, "skipped_keys": list(self.skipped_keys)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.skipped_keys, self._skipped = [], set()
        self._record_skipped(state.get("skipped_keys", ()), quiet=True)
        self._iter, self._pending = None, None

    def _start_epoch(self) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, self.offset)
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)  # worker seeds per epoch
            self._iter = iter(self.loader)
            return
        for obj in (self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None),
                    getattr(self.loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        # Whatever the loader draws from the global RNGs when an epoch starts (worker seeds, the shuffle seed,
        # the first batch) comes from a per-epoch seed instead, and batches skipped on resume leave the restored
        # RNG state alone: a resumed epoch then reproduces the interrupted one.
        seek = getattr(self.loader, "seek", None)
        with _seeded_rng(self.seed * 1_000_003 + self.epoch):
            if callable(seek):  # the loader starts at (epoch, offset) itself, without loading the batches before
                seek(self.epoch, self.offset)
                self._iter = iter(self.loader)
                self._pending = next(self._iter, _END)
                return
            self._iter = iter(self.loader)
            if self.offset == 0:
                self._pending = next(self._iter, _END)
            else:
                log.info("resuming inside epoch %d: skipping %d batches of the data loader", self.epoch, self.offset)
                for i in range(self.offset):
                    if next(self._iter, _END) is _END:
                        raise DataError(
                            f"cannot restore the data position: epoch {self.epoch} has only {i} batches, "
                            f"the checkpoint was at batch {self.offset}"
                        )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        empty_epochs = 0
        while True:
            if self._iter is None:
                self._start_epoch()
            if self._pending is not None:
                batch, self._pending = self._pending, None
            else:
                batch = next(self._iter, _END)
            if batch is _END:
                self._iter = None
                if self.offset == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise DataError("the training data yielded no batches; check the data set and batch size")
                self.epoch, self.offset = self.epoch + 1, 0
                continue
            self.offset += 1
            if self.sampler is not None or self._reports_skipped:
                batch, skipped = batch
                self._record_skipped(skipped)
            return batch

"""Batches for the engine: a resumable, rank-aware batch sampler, a dict collate and device moves.

The sampler thinks in global batches: epoch e shuffles all indices with seed `seed + e`, global batch k takes
the next `global_batch` of them, and rank r gets the r-th contiguous slice. So N processes see exactly the
batches one process would (in rank order), and a resume jumps straight to (epoch, batch) without loading data.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from xmodal.errors import ConfigError, DataError
from xmodal.features import Features

log = logging.getLogger(__name__)


_END = object()


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

    Over a map-style data set the engine owns the loader and sampler, so restoring is exact and free; over any
    other iterable (a DataLoader a job built) the epoch is re-iterated and `offset` batches are skipped.
    """

    def __init__(self, data: Dataset | Iterable, *, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, collate_fn=None, num_workers: int = 0, pin_memory: bool = False):
        self.epoch, self.offset = 0, 0
        self.seed = seed
        self._iter: Iterator | None = None
        self._pending: Any = None
        self.sampler: ResumableBatchSampler | None = None
        if is_map_dataset(data):
            self.sampler = ResumableBatchSampler(len(data), global_batch, rank=rank, world_size=world_size,
                                                 seed=seed)
            self.generator = torch.Generator()
            self.loader: Iterable = DataLoader(
                data, batch_sampler=self.sampler, collate_fn=collate_fn or collate_samples,
                num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                generator=self.generator,
            )
        else:
            self.loader = data

    @property
    def samples_per_batch(self) -> int | None:
        return self.sampler.global_batch if self.sampler else None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._iter, self._pending = None, None

    def _start_epoch(self) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, self.offset)
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)  # worker seeds per epoch
            self._iter = iter(self.loader)
            return
        for obj in (self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        # Whatever the loader draws from the global RNGs when an epoch starts (worker seeds, the shuffle seed,
        # the first batch) comes from a per-epoch seed instead, and batches skipped on resume leave the restored
        # RNG state alone: a resumed epoch then reproduces the interrupted one.
        with _seeded_rng(self.seed * 1_000_003 + self.epoch):
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
            return batch

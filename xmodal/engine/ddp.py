"""Multi-process training: process-group setup from torchrun variables and DDP wrapping.

`torchrun --nproc_per_node N -m xmodal distill CONFIG` sets RANK/WORLD_SIZE/LOCAL_RANK; the engine then joins
the group (NCCL on GPUs, gloo on CPU), gives each process one device and wraps the trainable module in DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from xmodal.device import resolve_device
from xmodal.distributed import is_distributed

log = logging.getLogger(__name__)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | torch.device = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1 and return this process's device (cuda:LOCAL_RANK).

    Safe to call more than once (a job calls it to place its models, then the engine calls it again): a group
    already joined is kept, and the same settings give the same device.
    """
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None and (is_distributed() or env_world_size() > 1):
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if is_distributed() else 0))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env_world_size() > 1 and not is_distributed():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return device


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `module` when running distributed; the module itself otherwise."""
    if not is_distributed() or dist.get_world_size() == 1:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks: for work that writes shared files once (generating
    a synthetic data set), which the others then find done. Without a process group it just runs the block."""
    main = not is_distributed() or dist.get_rank() == 0
    if not main:
        barrier()  # wait for rank 0 to finish (or fail) the block
    try:
        yield
    finally:
        if main:
            barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (identity when not distributed); keys must match on every rank."""
    if not is_distributed() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (so all ranks stop together)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj):
    """List of `obj` from every rank (a one-item list when not distributed)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

"""Process-group helpers; batch-level losses gather features over ranks with gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from xmodal.features import Features


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's own slice."""
    if not is_distributed() or world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank along dim 0 without gradient (teacher outputs, masks)."""
    if not is_distributed() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_features(f: Features) -> Features:
    """Gather every field of `f` over ranks; float fields keep gradients, the mask does not need them."""
    if not is_distributed() or world_size() == 1:
        return f

    def gather(t: Tensor) -> Tensor:
        return gather_with_grad(t) if t.requires_grad else gather_no_grad(t)

    return Features(
        pooled=gather(f.pooled),
        tokens=None if f.tokens is None else gather(f.tokens),
        mask=None if f.mask is None else gather_no_grad(f.mask),
        logits=None if f.logits is None else gather(f.logits),
    )

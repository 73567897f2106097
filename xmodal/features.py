"""Features: the one currency between adapters, the alignment space and the losses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(list(t.shape))


@dataclass
class Features:
    """pooled [B, D]; optional tokens [B, T, Dt] with bool mask [B, T] (True = real); optional logits.

    Logits are [B, C] for per-sample outputs or [B, T, C] for per-step outputs (CTC posteriors).
    """

    pooled: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None
    logits: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pooled, Tensor) or self.pooled.dim() != 2:
            raise ValueError(f"Features.pooled must be a [B, D] tensor, got shape {_shape(self.pooled)}")
        b = self.pooled.shape[0]
        if self.tokens is not None:
            if self.tokens.dim() != 3 or self.tokens.shape[0] != b:
                raise ValueError(
                    f"Features.tokens must be [B, T, D] with B={b} (from pooled), got {_shape(self.tokens)}"
                )
            if self.mask is None:
                self.mask = torch.ones(self.tokens.shape[:2], dtype=torch.bool, device=self.tokens.device)
        if self.mask is not None:
            if self.tokens is None:
                raise ValueError("Features.mask was given without tokens; a mask describes token padding")
            if self.mask.dtype != torch.bool:
                raise ValueError(f"Features.mask must be a bool tensor (True = real token), got {self.mask.dtype}")
            if tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
                raise ValueError(
                    f"Features.mask shape {_shape(self.mask)} does not match tokens [B, T] = "
                    f"{list(self.tokens.shape[:2])}"
                )
        if self.logits is not None:
            if self.logits.dim() not in (2, 3) or self.logits.shape[0] != b:
                raise ValueError(
                    f"Features.logits must be [B, C] or [B, T, C] with B={b}, got {_shape(self.logits)}"
                )

    @property
    def batch_size(self) -> int:
        return self.pooled.shape[0]

    @property
    def dim(self) -> int:
        return self.pooled.shape[1]

    @property
    def lengths(self) -> Tensor:
        """Number of real tokens per sample ([B] long); raises when there are no tokens."""
        if self.mask is None:
            raise ValueError("Features.lengths needs tokens with a mask")
        return self.mask.sum(dim=1)

    def map(self, fn: Callable[[Tensor], Tensor], *, include_mask: bool = False) -> Features:
        """Apply `fn` to every float tensor field (and to the mask when `include_mask`)."""
        return Features(
            pooled=fn(self.pooled),
            tokens=None if self.tokens is None else fn(self.tokens),
            mask=None if self.mask is None else (fn(self.mask) if include_mask else self.mask),
            logits=None if self.logits is None else fn(self.logits),
        )

    def detach(self) -> Features:
        return self.map(Tensor.detach)

    def float(self) -> Features:
        return self.map(Tensor.float)

    def to(self, *args, **kwargs) -> Features:
        """Move to a device (mask included) or cast float fields to a dtype (mask stays bool)."""
        if args and isinstance(args[0], torch.dtype) or "dtype" in kwargs:
            return self.map(lambda t: t.to(*args, **kwargs))
        return self.map(lambda t: t.to(*args, **kwargs), include_mask=True)

    def replace(self, **fields) -> Features:
        return dataclasses.replace(self, **fields)

    def index(self, idx: Tensor | slice) -> Features:
        """Select samples along the batch dimension."""
        return self.map(lambda t: t[idx], include_mask=True)

"""Features: the one currency between adapters, the alignment space and the losses.

A model's Features are its *native* features: what it is evaluated on and what export ships. A student whose
width differs from the teacher's (or that is given a projection) also carries a *projected* view, the same
samples mapped into the teacher's width by its alignment-space projection (timm's forward_features /
forward_head split). Each loss declares the view it compares (`DistillLoss.view`) and sees only that one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

NATIVE = "native"  # the model's own features: evaluation, export and same-space losses (clip, affinity, dcd)
PROJECTED = "projected"  # mapped into the teacher's width: losses that compare against teacher features (fd, icl)
VIEWS = (NATIVE, PROJECTED)


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(list(t.shape))


@dataclass
class Features:
    """pooled [B, D]; optional tokens [B, T, Dt] with bool mask [B, T] (True = real); optional logits.

    Logits are [B, C] for per-sample outputs or [B, T, C] for per-step outputs (CTC posteriors).
    `logit_scale` is the model's own inverse temperature for similarities of these embeddings (0-d; open_clip's
    `logit_scale.exp()`), so a contrastive loss trains the temperature the model ships with.
    `projected` is the projected view (teacher width) when the model's projection is not the identity.
    """

    pooled: Tensor
    tokens: Tensor | None = None
    mask: Tensor | None = None
    logits: Tensor | None = None
    logit_scale: Tensor | None = None
    projected: Features | None = None

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
        if self.logit_scale is not None and (not isinstance(self.logit_scale, Tensor) or self.logit_scale.numel() != 1):
            raise ValueError(f"Features.logit_scale must be a one-element tensor, got {_shape(self.logit_scale)}")
        if self.projected is not None:
            if not isinstance(self.projected, Features) or self.projected.projected is not None:
                raise ValueError("Features.projected must be Features without a projected view of its own")
            if self.projected.batch_size != b:
                raise ValueError(f"Features.projected holds {self.projected.batch_size} samples, pooled holds {b}")

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

    def describe(self) -> str:
        """The fields present and their shapes, e.g. "pooled [8, 32], logits [8, 10]" (for error messages)."""
        fields = {"pooled": self.pooled, "tokens": self.tokens, "logits": self.logits}
        out = ", ".join(f"{k} {_shape(v)}" for k, v in fields.items() if v is not None)
        if self.projected is not None:
            out += f" (projected: {self.projected.describe()})"
        return out

    def view(self, name: str) -> Features:
        """The native or the projected view alone; without a projection both are these features."""
        if name not in VIEWS:
            raise ValueError(f"Features view must be one of {VIEWS}, got '{name}'")
        if self.projected is None:
            return self
        return self.projected if name == PROJECTED else dataclasses.replace(self, projected=None)

    def map(self, fn: Callable[[Tensor], Tensor], *, include_mask: bool = False, per_sample: bool = False) -> Features:
        """Apply `fn` to every float tensor field (and to the mask when `include_mask`), the projected view too.

        `per_sample` marks an `fn` that works along the batch dimension: the 0-d logit_scale is then kept as is.
        """
        scale = self.logit_scale
        return Features(
            pooled=fn(self.pooled),
            tokens=None if self.tokens is None else fn(self.tokens),
            mask=None if self.mask is None else (fn(self.mask) if include_mask else self.mask),
            logits=None if self.logits is None else fn(self.logits),
            logit_scale=None if scale is None else (scale if per_sample else fn(scale)),
            projected=None if self.projected is None else self.projected.map(
                fn, include_mask=include_mask, per_sample=per_sample),
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
        return self.map(lambda t: t[idx], include_mask=True, per_sample=True)


def select_view(outputs: Mapping[str, Features] | None, name: str) -> Mapping[str, Features] | None:
    """`outputs` with every Features reduced to view `name` (returned as is when none carries a projection)."""
    if name not in VIEWS:
        raise ValueError(f"Features view must be one of {VIEWS}, got '{name}'")
    if outputs is None or not any(isinstance(f, Features) and f.projected is not None for f in outputs.values()):
        return outputs
    return {k: f.view(name) if isinstance(f, Features) else f for k, f in outputs.items()}

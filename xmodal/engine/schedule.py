"""AdamW with decoupled weight decay groups and a linear-warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from xmodal.config import TrainConfig
from xmodal.errors import ConfigError


class WarmupCosine:
    """LR multiplier for step s (0-based): linear warmup to 1, then cosine decay to `min_lr_ratio`.

    A plain object (not a closure) so LambdaLR's state_dict holds only numbers and loads with weights_only.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        if total_steps < 1:
            raise ConfigError(f"train.steps must be at least 1, got {total_steps}")
        if warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Trainable parameters split like open_clip: no decay for biases, norms, gains and scalar scales (ndim < 2)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for _, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ConfigError("nothing to train: the student and the losses have no parameters with requires_grad=True")
    return groups


def build_optimizer(modules: Iterable[nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-6 as in open_clip) over every trainable parameter of `modules`."""
    if cfg.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {cfg.lr}")
    return torch.optim.AdamW(param_groups(modules, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step LambdaLR following WarmupCosine(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
    )

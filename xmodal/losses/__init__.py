"""Loss registry and the built-in losses; importing this package registers every core loss."""

import importlib
import pkgutil

from xmodal.losses.base import (
    LOSSES,
    DistillLoss,
    LossOutput,
    LossSet,
    Need,
    build_losses,
    register_loss,
    sample_weighted_mean,
    soft_cross_entropy,
)

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "LOSSES",
    "DistillLoss",
    "LossOutput",
    "LossSet",
    "Need",
    "build_losses",
    "register_loss",
    "sample_weighted_mean",
    "soft_cross_entropy",
]

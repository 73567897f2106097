"""The alignment space: one shared width, a projection per (role, modality) from each encoder's width.

Projections serve only the losses that compare a model's features with the other model's directly (FD, ICL,
LIBS): they see the projected view. Everything else (evaluation, export, same-space losses) uses native features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from xmodal.adapters.base import ModalityAdapter, project_features
from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.registry import Registry

ROLES = ("teacher", "student")

PROJECTIONS: Registry = Registry("projection")


@PROJECTIONS.register("identity")
def identity_projection(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ConfigError(
            f"projection 'identity' needs equal widths, got {in_dim} → {out_dim}; use 'linear' or 'mlp'"
        )
    return nn.Identity()


@PROJECTIONS.register("linear")
def linear_projection(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


@PROJECTIONS.register("mlp")
def mlp_projection(in_dim: int, out_dim: int) -> nn.Module:
    hidden = max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class AlignmentSpace(nn.Module):
    """Named projections into one space of width `dim`, so teacher-comparing losses never see architecture widths."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = int(dim)
        self.projections = nn.ModuleDict()
        self.adapters: dict[str, ModalityAdapter] = {}

    @staticmethod
    def key(role: str, modality: str) -> str:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got '{role}'")
        return f"{role}__{modality}"

    def add_projection(self, role: str, modality: str, in_dim: int, kind: str = "linear") -> nn.Module:
        proj = PROJECTIONS.build(kind, in_dim=in_dim, out_dim=self.dim)
        self.projections[self.key(role, modality)] = proj
        return proj

    def attach(self, role: str, adapter: ModalityAdapter, kind: str | None = None) -> ModalityAdapter:
        """Give `adapter` its projection into this space (identity by default when widths already match)."""
        if kind is None:
            kind = "identity" if adapter.width == self.dim else "linear"
        adapter.projection = self.add_projection(role, adapter.modality, adapter.width, kind)
        self.adapters[self.key(role, adapter.modality)] = adapter
        return adapter

    def project(self, role: str, modality: str, features: Features) -> Features:
        """The projected view of native `features` of (role, modality)."""
        key = self.key(role, modality)
        if key not in self.projections:
            have = ", ".join(k.replace("__", ".") for k in self.projections) or "none"
            raise ConfigError(f"alignment space has no projection for {role}.{modality}; attached: {have}")
        return project_features(self.projections[key], features)

    def encode(self, role: str, batch: Mapping[str, Any]) -> dict[str, Features]:
        """Run every adapter attached for `role` on the batch: native Features by modality, each carrying its
        projected view when its projection is not the identity."""
        out = {}
        for key, adapter in self.adapters.items():
            r, modality = key.split("__", 1)
            if r == role:
                out[modality] = adapter(batch)
        return out

    def student_parameters(self):
        """Trainable projection parameters (both roles' projections train with the student)."""
        return [p for p in self.projections.parameters() if p.requires_grad]

"""Loss registry, the loss interface and the weighted loss set built from config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from xmodal.config import LossSpec
from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.registry import Registry

Outputs = Mapping[str, Features]

LOSSES: Registry[type[DistillLoss]] = Registry("loss")


def register_loss(name: str):
    """Class decorator: register a DistillLoss subclass under `name` (its `name` attribute is set too)."""

    def deco(cls):
        cls.name = name
        return LOSSES.register(name, cls)

    return deco


@dataclass
class LossOutput:
    """A scalar to optimise and its named parts for logging."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Base class: consumes aligned Features keyed by modality ("image", "text", "audio", "video", "bev")."""

    name: str = "loss"

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        raise NotImplementedError

    def pick(self, outputs: Outputs | None, modality: str, role: str) -> Features:
        """Fetch outputs[modality] with an error that says which loss needed what."""
        if outputs is None:
            raise ConfigError(f"loss '{self.name}' needs {role} outputs, but none were given")
        if modality not in outputs:
            raise ConfigError(
                f"loss '{self.name}' needs {role} features for modality '{modality}', "
                f"but the {role} produced: {', '.join(outputs) or 'nothing'}"
            )
        return outputs[modality]


def sample_weighted_mean(values: Tensor, batch: Mapping | None) -> Tensor:
    """Mean of per-sample values [B], weighted by batch["sample_weight"] when present (teacher filtering)."""
    weight = None if batch is None else batch.get("sample_weight")
    if weight is None:
        return values.mean()
    weight = weight.to(values.dtype)
    if weight.shape != values.shape:
        raise ValueError(f"sample_weight has shape {list(weight.shape)}, expected {list(values.shape)}")
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Row-wise CE(z, p) = -Σ p·log_softmax(z), returned per row."""
    return -(target_probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1)


class LossSet(nn.Module):
    """Weighted sum of registry losses; parts are reported as `label` and `label/part`."""

    def __init__(self, losses: Sequence[tuple[str, float, DistillLoss]]):
        super().__init__()
        labels = [label for label, _, _ in losses]
        dupes = {lab for lab in labels if labels.count(lab) > 1}
        if dupes:
            raise ConfigError(f"losses: label(s) {sorted(dupes)} used twice; give each a distinct 'label'")
        self.labels = labels
        self.weights = [w for _, w, _ in losses]
        self.losses = nn.ModuleList([loss for _, _, loss in losses])

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        total = None
        parts: dict[str, Tensor] = {}
        for label, weight, loss in zip(self.labels, self.weights, self.losses):
            if weight == 0:
                continue
            out = loss(student, teacher, batch)
            parts[label] = out.loss.detach()
            for k, v in out.parts.items():
                parts[f"{label}/{k}"] = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
            total = weight * out.loss if total is None else total + weight * out.loss
        if total is None:
            raise ConfigError("losses: every loss has weight 0; nothing to optimise")
        return LossOutput(total, parts)


def build_losses(specs: Sequence[LossSpec | Mapping]) -> LossSet:
    """Build a LossSet from specs (LossSpec or plain mappings with name/weight/params/label)."""
    from xmodal.config import from_dict

    if not specs:
        raise ConfigError("losses: at least one loss is needed, e.g. [{name: affinity, weight: 1.0}]")
    built = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, LossSpec):
            spec = from_dict(LossSpec, spec, source=f"losses[{i}]")
        loss = LOSSES.build(spec.name, **spec.params)
        built.append((spec.label or spec.name, spec.weight, loss))
    return LossSet(built)

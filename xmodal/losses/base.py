"""Loss registry, the loss interface and the weighted loss set built from config."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from xmodal.config import LossSpec
from xmodal.errors import ConfigError
from xmodal.features import NATIVE, Features, select_view
from xmodal.registry import Registry

Outputs = Mapping[str, Features]
Produces = Mapping[str, Collection[str]]  # modality → the Features fields a model fills, e.g. {"image": ["pooled"]}

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


@dataclass(frozen=True)
class Need:
    """One input a loss reads: a Features `field` ("pooled", "tokens", "logits") of `modality` from `role`."""

    role: str
    modality: str
    field: str = "pooled"

    def __str__(self) -> str:
        return f"{self.role} {self.modality}.{self.field}"


class DistillLoss(nn.Module):
    """Base class: consumes Features keyed by modality ("image", "text", "audio", "video", "bev").

    `view` says which features the loss compares: "native" (the default: what the model is evaluated on and
    exported as; right for every loss that compares a model with itself or similarity matrices across models)
    or "projected" (into the teacher's width, for losses that compare student and teacher features directly).
    Calling a loss hands it that view of both models' outputs, so it never trains through a projection that
    evaluation skips unless it compares against the teacher.
    """

    name: str = "loss"
    view: ClassVar[str] = NATIVE

    def __call__(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        return super().__call__(select_view(student, self.view), select_view(teacher, self.view), batch)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        raise NotImplementedError

    def needs(self) -> list[Need] | None:
        """The inputs this loss reads, checked against what the models produce before training
        (`LossSet.check_inputs`); None when not declared (the loss checks its inputs when called)."""
        return None

    def pick(self, outputs: Outputs | None, modality: str, role: str) -> Features:
        """Fetch outputs[modality] with an error that says which loss needed what."""
        if outputs is None:
            raise ConfigError(f"loss '{self.name}' needs {role} outputs, but this run has no {role}; "
                              f"give it a {role} or drop the loss")
        if modality not in outputs:
            raise ConfigError(
                f"loss '{self.name}' needs {role} features for modality '{modality}', "
                f"but the {role} produced: {', '.join(outputs) or 'nothing'}"
            )
        return outputs[modality]

    def pick_field(self, outputs: Outputs | None, modality: str, role: str, field: str) -> Features:
        """outputs[modality], which must hold `field`; else an error naming the loss and what was there."""
        f = self.pick(outputs, modality, role)
        if getattr(f, field) is None:
            raise ConfigError(
                f"loss '{self.name}' needs {role} {field} for '{modality}', but the {role}'s '{modality}' Features "
                f"hold {f.describe()}; choose a loss that uses what the models produce"
            )
        return f


def describe_produces(produces: Produces | None) -> str:
    if produces is None:
        return "nothing (no model in that role)"
    return "; ".join(f"{m}: {', '.join(fields)}" for m, fields in produces.items()) or "nothing"


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
    """Weighted sum of registry losses; parts are reported as `label` and `label/part`.

    Each loss is handed the view of the outputs it declares (native or projected, `DistillLoss.view`).
    """

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

    def check_inputs(self, student: Produces, teacher: Produces | None, hint: str = "") -> None:
        """Refuse, before training, a loss whose declared inputs the models do not produce (e.g. logits from
        embedding models, or any teacher input in a run without a teacher). `student`/`teacher` map each
        modality to the Features fields that model fills; `teacher` is None when the run has no teacher."""
        produced = {"student": student, "teacher": teacher}
        for label, weight, loss in zip(self.labels, self.weights, self.losses):
            needs = loss.needs() if weight else None
            missing = [n for n in needs or () if n.field not in (produced[n.role] or {}).get(n.modality, ())]
            if missing:
                name = f"'{loss.name}'" + (f" (label '{label}')" if label != loss.name else "")
                raise ConfigError(
                    f"losses: {name} needs {', '.join(map(str, missing))}, but the student produces "
                    f"{describe_produces(student)} and the teacher {describe_produces(teacher)}"
                    + (f". {hint}" if hint else "")
                )


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

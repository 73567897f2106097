"""Feature distillation beyond MSE: linear CKA, ND (norm and direction to teacher class means) and OFA.

CKA compares similarity structure, so it reads each model's native features (widths may differ). ND and OFA
compare the student with the teacher directly and read the student's projected view (teacher width).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.errors import ConfigError, DataError
from xmodal.features import NATIVE, PROJECTED, Features
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss, sample_weighted_mean
from xmodal.losses.logit import batch_targets, check_positive
from xmodal.losses.relation import RelationLoss, masked_mean


@register_loss("cka")
class LinearCKA(RelationLoss):
    """1 − ‖SᵀT‖²_F / (‖SᵀS‖_F·‖TᵀT‖_F) on centred features (linear CKA, Kornblith et al., 2019, "Similarity of
    Neural Network Representations Revisited"), over the batch or each sample's real tokens.

    Invariant to scale and orthogonal transforms of either model's features; widths may differ.
    """

    def relation(self, xs: Tensor, xt: Tensor, mask: Tensor) -> Tensor:
        def centred_gram(x: Tensor) -> Tensor:
            m = mask.to(x.dtype)[:, :, None]
            x = (x - masked_mean(x, mask[:, :, None].expand_as(x), (1,))[:, None, :]) * m
            x = x / x.detach().flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]  # scale-free, in range
            return x @ x.transpose(1, 2)  # [G, N, N]: HSIC via Gram matrices, N ≤ batch or tokens

        with torch.no_grad():
            lt = centred_gram(xt)
        ks = centred_gram(xs)
        hsic = (ks * lt).sum(dim=(1, 2))
        norms = ks.flatten(1).norm(dim=1) * lt.flatten(1).norm(dim=1)
        return 1.0 - hsic / norms.clamp_min(1e-30)


# ---------------------------------------------------------------- ND


def load_class_means(path: str | os.PathLike) -> Tensor:
    """Teacher class means [C, D] from a .pt/.pth file (a tensor or {"class_means": tensor}) or a .npy file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"class means file {path} does not exist; compute it once with "
            "xmodal.losses.feature_kd.teacher_class_means and save_class_means"
        )
    if path.suffix == ".npy":
        import numpy as np

        try:
            means = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise DataError(f"class means file {path} cannot be read: {e}") from None
    else:
        from xmodal.weights import load_weights

        obj = load_weights(path, what="class means file")
        means = obj.get("class_means") if isinstance(obj, Mapping) else obj
    if not isinstance(means, Tensor) or means.dim() != 2 or not means.is_floating_point():
        got = list(means.shape) if isinstance(means, Tensor) else type(means).__name__
        raise DataError(f"class means file {path} must hold a float tensor [classes, dim], got {got}")
    if not torch.isfinite(means).all():
        raise DataError(f"class means file {path} holds NaN or infinite values")
    return means.float()


def save_class_means(path: str | os.PathLike, means: Tensor) -> Path:
    """Write class means atomically as {"class_means": [C, D]} for `nd`'s class_means parameter."""
    from xmodal.io import atomic_torch_save

    atomic_torch_save({"class_means": means.detach().float().cpu()}, path)
    return Path(path)


@torch.no_grad()
def teacher_class_means(
    teacher: Callable[[Mapping], Mapping[str, Features]],
    batches: Iterable[Mapping],
    modality: str = "image",
    label_key: str = "label",
    num_classes: int | None = None,
) -> Tensor:
    """Mean teacher pooled feature per class [C, D], from one pass of `teacher` (a model or a TeacherCache: any
    callable batch → {modality: Features}) over `batches`. Every class must be seen at least once."""
    if isinstance(teacher, nn.Module):
        teacher.eval()
    sums: Tensor | None = None
    counts: Tensor | None = None
    for i, batch in enumerate(batches):
        if label_key not in batch:
            raise DataError(f"batch {i} has no '{label_key}' (keys: {', '.join(map(str, batch))})")
        with torch.inference_mode():
            out = teacher(batch)
        if modality not in out:
            raise ConfigError(f"the teacher produced {', '.join(out)}, not '{modality}'")
        x = out[modality].view(NATIVE).pooled.float().cpu()
        y = torch.as_tensor(batch[label_key]).long().cpu().reshape(-1)
        classes = max(int(y.max()) + 1, num_classes or 0)
        if sums is None:
            sums, counts = torch.zeros(classes, x.shape[1]), torch.zeros(classes)
        elif classes > sums.shape[0]:
            sums = torch.cat([sums, torch.zeros(classes - sums.shape[0], sums.shape[1])])
            counts = torch.cat([counts, torch.zeros(classes - counts.shape[0])])
        sums.index_add_(0, y, x)
        counts.index_add_(0, y, torch.ones(len(y)))
    if sums is None:
        raise DataError("teacher_class_means: no batches")
    if num_classes is not None and sums.shape[0] > num_classes:
        raise DataError(f"labels go up to {sums.shape[0] - 1}, but num_classes is {num_classes}")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise DataError(f"no sample of class(es) {missing[:10]}{'...' if len(missing) > 10 else ''}: their means "
                        "are undefined; pass data that covers every class")
    return sums / counts[:, None]


@register_loss("nd")
class NormDirection(DistillLoss):
    """mean_i [1 − ⟨s_i, ĉ_{y_i}⟩ / max(‖s_i‖, ‖t_i‖)], ĉ_y the unit teacher class mean of class y: the student's
    feature points toward its class centre with at least the teacher's norm (Wang et al., 2023, "Improving
    Knowledge Distillation via Regularizing Feature Norm and Direction").

    Class means [C, D] (teacher width) come from `class_means` (a .pt or .npy file, see `teacher_class_means` and
    `save_class_means`) or `set_class_means`; they are a buffer, so checkpoints carry them. The class is
    `batch[label_key]`, or the teacher's top class (from its logits) when label_key is null. Zero when s_i lies
    along ĉ_{y_i} with a norm of at least ‖t_i‖.
    """

    view = PROJECTED

    def __init__(self, modality: str = "image", class_means: str | None = None, label_key: str | None = "label"):
        super().__init__()
        self.modality = modality
        self.label_key = label_key
        self.class_means_path = class_means
        means = load_class_means(class_means) if class_means else torch.zeros(0, 0)
        self.register_buffer("class_means", means)

    def needs(self) -> list[Need]:
        needs = [Need("student", self.modality), Need("teacher", self.modality)]
        if self.label_key is None:
            needs.append(Need("teacher", self.modality, "logits"))
        return needs

    def batch_keys(self) -> list[str]:
        return [self.label_key] if self.label_key else []

    def set_class_means(self, means: Tensor) -> None:
        if means.dim() != 2:
            raise ValueError(f"class means must be [classes, dim], got {list(means.shape)}")
        self.class_means = means.detach().float().to(self.class_means.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "class_means"
        if key in state_dict and state_dict[key].shape != self.class_means.shape:
            self.class_means = torch.empty_like(state_dict[key], device=self.class_means.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        if self.class_means.numel() == 0:
            raise ConfigError(
                f"loss '{self.name}' has no teacher class means: set class_means to a file written by "
                "save_class_means(path, teacher_class_means(teacher, loader)), or call set_class_means"
            )
        fs = self.pick(student, self.modality, "student")
        ft = self.pick(teacher, self.modality, "teacher")
        s, t = fs.pooled.float(), ft.pooled.detach().float()
        means = self.class_means.to(s.device)
        if s.shape != t.shape or s.shape[1] != means.shape[1]:
            raise ConfigError(
                f"loss '{self.name}': student (projected) {list(s.shape)}, teacher {list(t.shape)} and class means "
                f"{list(means.shape)} must share the teacher's width"
            )
        if self.label_key is None:
            ref = self.pick_field(teacher, self.modality, "teacher", "logits").logits.detach().float()
        else:
            ref = torch.zeros(s.shape[0], means.shape[0], device=s.device)
        y = batch_targets(batch, self.label_key, ref, self.name)
        if y.dim() != 1 or (y.numel() and int(y.max()) >= means.shape[0]):
            raise DataError(
                f"loss '{self.name}' needs one class per sample below the {means.shape[0]} class means, got labels "
                f"{list(y.shape)} up to {int(y.max()) if y.numel() else '-'}"
            )
        centre = F.normalize(means[y], dim=-1)
        reach = torch.maximum(s.norm(dim=-1), t.norm(dim=-1)).clamp_min(1e-12)
        per = 1.0 - (s * centre).sum(dim=-1) / reach
        return LossOutput(sample_weighted_mean(per, batch))


# ---------------------------------------------------------------- OFA


def ofa_loss(logits_s: Tensor, logits_t: Tensor, y: Tensor, gamma: float, temperature: float) -> Tensor:
    """Per-sample Σ_c −[(p_T,c + 1[c=y])^γ − 1[c=y]]·log p_S,c at temperature T."""
    log_p_s = torch.log_softmax(logits_s / temperature, dim=-1)
    p_t = torch.softmax(logits_t / temperature, dim=-1)
    onehot = F.one_hot(y, logits_s.shape[-1]).to(p_t.dtype)
    weight = (p_t + onehot).pow(gamma) - onehot
    return -(weight * log_p_s).sum(dim=-1)


@register_loss("ofa")
class OFA(DistillLoss):
    """Σ_c −[(p_T,c + 1[c=y])^γ − 1[c=y]]·log softmax(head(s))_c: the student's features, projected into the
    teacher's logit space by a learned head, match the teacher's target-enhanced distribution (Hao et al., 2023,
    "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation").

    `dim` is the student's projected width (the teacher's), `num_classes` the teacher's logit count; `hidden` > 0
    makes the head a two-layer MLP. The head trains with the loss and is not part of the exported student.
    With gamma = 1 this is soft cross-entropy to the teacher (minimal where head(s) matches its distribution).
    """

    required_params: ClassVar[dict] = {"dim": 512, "num_classes": 1000}  # examples for `xmodal losses`

    view = PROJECTED

    def __init__(
        self,
        modality: str = "image",
        dim: int | None = None,
        num_classes: int | None = None,
        hidden: int = 0,
        temperature: float = 1.0,
        gamma: float = 1.0,
        label_key: str | None = "label",
    ):
        super().__init__()
        for key, value in (("dim", dim), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"loss '{self.name}': {key} must be a positive integer (dim: the student's projected width, "
                    f"num_classes: the teacher's number of logits), got {value!r}"
                )
        check_positive(self.name, temperature=temperature, gamma=gamma)
        self.modality = modality
        self.temperature, self.gamma = float(temperature), float(gamma)
        self.label_key = label_key
        self.dim, self.num_classes = dim, num_classes
        if hidden:
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Linear(dim, num_classes)

    def needs(self) -> list[Need]:
        return [Need("student", self.modality), Need("teacher", self.modality, "logits")]

    def batch_keys(self) -> list[str]:
        return [self.label_key] if self.label_key else []

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        fs = self.pick(student, self.modality, "student")
        zt = self.pick_field(teacher, self.modality, "teacher", "logits").logits.detach().float()
        s = fs.pooled.float()
        if s.shape[-1] != self.dim or zt.dim() != 2 or zt.shape != (s.shape[0], self.num_classes):
            raise ConfigError(
                f"loss '{self.name}': the head maps width {self.dim} to {self.num_classes} logits, but the "
                f"student's projected features are {list(s.shape)} and the teacher's logits {list(zt.shape)}; "
                "set dim and num_classes to match"
            )
        y = batch_targets(batch, self.label_key, zt, self.name)
        zs = self.head(s).float()
        return LossOutput(sample_weighted_mean(ofa_loss(zs, zt, y, self.gamma, self.temperature), batch))

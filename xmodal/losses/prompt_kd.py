"""PromptKD: distil a teacher's zero-shot class distribution into a prompted student over stored class vectors.

`z_t = τ_t·t(x)·W_Tᵀ` and `z_s = τ_s·norm(g(s(x)))·W_Tᵀ` arrive as the two models' image logits (the teacher and the
prompted student compute them against the same stored teacher class vectors `W_T`); the loss is
`T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))` summed over classes and averaged over the batch, never over batch × classes,
which would tie its weight to the number of classes (Li et al., 2024, "PromptKD: Unsupervised Prompt Distillation
for Vision-Language Models"). `mode: symmetric` averages both directions, ½[KL(p_t‖p_s) + KL(p_s‖p_t)], as KDPL
does (Mistretta et al., 2024). With `ce_weight > 0`, a cross-entropy term on `batch[label_key]` joins; labels are
read only then, so unlabelled image folders train with the default settings.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.losses.base import LossOutput, Outputs, register_loss, sample_weighted_mean
from xmodal.losses.logit import LogitLoss, batch_targets, kl_div, reduce_steps

MODES = ("forward", "symmetric")


@register_loss("prompt_kd")
class PromptKD(LogitLoss):
    """T²·KL(p_t^T ‖ p_s^T) over the stored class vectors (forward, default) or its symmetric form, batch mean;
    plus `ce_weight`·CE(z_s, y) when labels are wanted (`label_key: null` takes the teacher's top class)."""

    def __init__(self, modality: str = "image", temperature: float = 1.0, mode: str = "forward",
                 ce_weight: float = 0.0, label_key: str | None = "label"):
        super().__init__(modality, temperature)
        if mode not in MODES:
            raise ConfigError(f"loss '{self.name}': mode must be one of {', '.join(MODES)}, got '{mode}'")
        if not isinstance(ce_weight, (int, float)) or ce_weight < 0:
            raise ConfigError(f"loss '{self.name}': ce_weight must be a number ≥ 0, got {ce_weight!r}")
        self.mode = mode
        self.ce_weight = float(ce_weight)
        self.label_key = label_key

    @property
    def reads_labels(self) -> bool:
        """True when the cross-entropy term is on and reads labels from the batch."""
        return self.ce_weight > 0 and self.label_key is not None

    def batch_keys(self) -> list[str]:
        """The batch entries this loss reads besides the models' outputs: the labels, only when the CE term is on."""
        return [self.label_key] if self.reads_labels else []

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        t = self.temperature
        log_p_s = torch.log_softmax(zs / t, dim=-1)
        log_p_t = torch.log_softmax(zt / t, dim=-1)
        div = kl_div(log_p_t, log_p_s)
        if self.mode == "symmetric":
            div = 0.5 * (div + kl_div(log_p_s, log_p_t))
        kd = sample_weighted_mean(reduce_steps(div * (t * t), mask), batch)
        if not self.ce_weight:
            return LossOutput(kd)
        y = batch_targets(batch, self.label_key, zt, self.name)
        ce = F.cross_entropy(zs.reshape(-1, zs.shape[-1]), y.reshape(-1), reduction="none").reshape(y.shape)
        ce = sample_weighted_mean(reduce_steps(ce, mask), batch)
        return LossOutput(kd + self.ce_weight * ce, {"kd": kd.detach(), "ce": ce.detach()})

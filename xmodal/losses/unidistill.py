"""UniDistill's three BEV distillation terms: feature, relation and response, all around ground-truth boxes.

Every term looks at the ground-truth boxes of the batch (batch["boxes"] [B, N, 7], batch["box_mask"] [B, N],
batch["bev_grid"]; see `BEVSceneDataset.collate`) and is averaged over the real (non-padding) boxes of the batch:
a padding box contributes nothing and a batch without boxes gives 0 (with the graph kept, so DDP stays in step).
Student and teacher maps must lie on the batch's grid. Only the student receives gradients.

- `unidistill_feature`: mean L1 between student (projected) and teacher features sampled bilinearly at each box's
  nine keypoints (four BEV corners, four edge midpoints, centre) on the encoder-output map ("bev_encoder").
- `unidistill_relation`: per box, the 9×9 cosine-similarity matrix of its keypoint features on the backbone output
  ("bev"); mean L1 between the student's and the teacher's matrices.
- `unidistill_response`: per box, L1 between the class-max heatmaps (student sigmoid vs sigmoid of the teacher's
  logits softened by `temperature`) and between the regression maps ("bev_box"), weighted by a Gaussian around
  the box centre (σ = `sigma_scale` × half the box's BEV diagonal, at least `min_sigma` m) and divided by the
  mask's sum.
UniDistill's camera←LiDAR objective: detection + 100·feature + 40·relation + 10·response.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.features import NATIVE, PROJECTED
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss
from xmodal.nn.bev import (
    BEV,
    BEV_BOX,
    BEV_ENCODER,
    batch_boxes,
    box_sigma,
    gaussian_masks,
    sample_keypoints,
    tokens_to_map,
)

BOX_KEYS = ("boxes", "box_mask", "bev_grid")


def mean_over_boxes(per_box: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-box values [B, N] over the real boxes; 0 (attached to the graph) when there are none."""
    per_box = torch.where(mask, per_box, torch.zeros_like(per_box))  # drop padding, NaN-safe
    return per_box.sum() / mask.sum().clamp_min(1)


class _BoxLoss(DistillLoss):
    """A distillation term around ground-truth boxes on one BEV Features key."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def needs(self) -> list[Need]:
        return [Need(role, self.key, "tokens") for role in ("student", "teacher")]

    def batch_keys(self) -> list[str]:
        return list(BOX_KEYS)

    def maps(self, student: Outputs, teacher: Outputs | None, batch: Mapping | None) -> tuple[Tensor, Tensor, Tensor,
                                                                                               Tensor, object]:
        boxes, mask, grid = batch_boxes(batch, f"loss '{self.name}'")
        s = self.pick_field(student, self.key, "student", "tokens").tokens
        t = self.pick_field(teacher, self.key, "teacher", "tokens").tokens.detach()
        if s.shape != t.shape:
            raise ConfigError(
                f"loss '{self.name}' on '{self.key}': student {list(s.shape)} vs teacher {list(t.shape)}; both must be "
                "maps on the same BEV grid with the same channels (give the student a projection to the teacher width)"
            )
        s_map = tokens_to_map(s.float(), grid, f"loss '{self.name}': student '{self.key}'")
        t_map = tokens_to_map(t.float(), grid, f"loss '{self.name}': teacher '{self.key}'")
        return s_map, t_map, boxes.to(s.device).float(), mask.to(s.device), grid


@register_loss("unidistill_feature")
class UniDistillFeature(_BoxLoss):
    """Mean L1 between student and teacher encoder-map features at the nine keypoints of every real box."""

    view = PROJECTED

    def __init__(self, key: str = BEV_ENCODER):
        super().__init__(key)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        s_map, t_map, boxes, mask, grid = self.maps(student, teacher, batch)
        fs, ft = sample_keypoints(s_map, boxes, grid), sample_keypoints(t_map, boxes, grid)  # [B, C, N, 9]
        per_box = (fs - ft).abs().mean(dim=(1, 3))
        return LossOutput(mean_over_boxes(per_box, mask), {"boxes": mask.sum().float()})


def keypoint_relations(feats: Tensor) -> Tensor:
    """[B, C, N, 9] keypoint features → [B, N, 9, 9] cosine similarities between a box's keypoints."""
    unit = F.normalize(feats, dim=1, eps=1e-8)
    return torch.einsum("bcnk,bcnl->bnkl", unit, unit)


@register_loss("unidistill_relation")
class UniDistillRelation(_BoxLoss):
    """Mean L1 between the student's and the teacher's 9×9 keypoint cosine-similarity matrices, per real box."""

    view = PROJECTED

    def __init__(self, key: str = BEV):
        super().__init__(key)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        s_map, t_map, boxes, mask, grid = self.maps(student, teacher, batch)
        rs = keypoint_relations(sample_keypoints(s_map, boxes, grid))
        rt = keypoint_relations(sample_keypoints(t_map, boxes, grid))
        per_box = (rs - rt).abs().mean(dim=(2, 3))
        return LossOutput(mean_over_boxes(per_box, mask), {"boxes": mask.sum().float()})


@register_loss("unidistill_response")
class UniDistillResponse(DistillLoss):
    """Gaussian-weighted L1 between class-max heatmaps and between box regressions around every real box."""

    view = NATIVE

    def __init__(self, key: str = BEV, box_key: str = BEV_BOX, temperature: float = 1.0, sigma_scale: float = 0.5,
                 min_sigma: float = 0.5, regression_weight: float = 1.0):
        super().__init__()
        if temperature <= 0 or sigma_scale <= 0 or min_sigma <= 0:
            raise ConfigError(f"loss 'unidistill_response': temperature ({temperature}), sigma_scale ({sigma_scale}) "
                              f"and min_sigma ({min_sigma}) must be positive")
        self.key, self.box_key = key, box_key
        self.temperature, self.sigma_scale, self.min_sigma = float(temperature), float(sigma_scale), float(min_sigma)
        self.regression_weight = float(regression_weight)

    def needs(self) -> list[Need]:
        return [Need(role, k, f) for role in ("student", "teacher")
                for k, f in ((self.key, "logits"), (self.box_key, "tokens"))]

    def batch_keys(self) -> list[str]:
        return list(BOX_KEYS)

    def masks(self, boxes: Tensor, grid) -> Tensor:
        """[B, N, H·W] Gaussian weights around each box centre (padding boxes are dropped by the caller)."""
        return gaussian_masks(boxes, grid, box_sigma(boxes, self.sigma_scale, self.min_sigma))

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        boxes, mask, grid = batch_boxes(batch, f"loss '{self.name}'")
        s_cls = self.pick_field(student, self.key, "student", "logits").logits.float()
        t_cls = self.pick_field(teacher, self.key, "teacher", "logits").logits.detach().float()
        s_reg = self.pick_field(student, self.box_key, "student", "tokens").tokens.float()
        t_reg = self.pick_field(teacher, self.box_key, "teacher", "tokens").tokens.detach().float()
        cells = grid.height * grid.width
        for what, s, t in (("heatmap logits", s_cls, t_cls), ("regression", s_reg, t_reg)):
            if s.shape != t.shape or s.dim() != 3 or s.shape[1] != cells:
                raise ConfigError(
                    f"loss '{self.name}': student {what} {list(s.shape)} vs teacher {list(t.shape)}; both must hold "
                    f"one row per cell of the {grid.height}x{grid.width} grid with the same classes/channels"
                )
        boxes, mask = boxes.to(s_cls.device).float(), mask.to(s_cls.device)
        weight = self.masks(boxes, grid)  # [B, N, H·W]
        norm = weight.sum(-1).clamp_min(1e-12)
        heat = (torch.sigmoid(s_cls).amax(-1) - torch.sigmoid(t_cls / self.temperature).amax(-1)).abs()  # [B, H·W]
        reg = (s_reg - t_reg).abs().mean(-1)  # [B, H·W]
        heat_box = torch.einsum("bnc,bc->bn", weight, heat) / norm
        reg_box = torch.einsum("bnc,bc->bn", weight, reg) / norm
        heat_loss, reg_loss = mean_over_boxes(heat_box, mask), mean_over_boxes(reg_box, mask)
        return LossOutput(heat_loss + self.regression_weight * reg_loss,
                          {"heatmap": heat_loss.detach(), "regression": reg_loss.detach()})

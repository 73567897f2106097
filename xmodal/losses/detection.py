"""CenterPoint detection loss: focal loss on the class heatmaps and L1 on the box regression at box centres.

Reads the student's "bev" logits (heatmap) and "bev_box" tokens (regression) and the batch's ground truth
(batch["boxes"], "box_labels", "box_mask", "bev_grid"; see `BEVSceneDataset.collate`). Boxes whose centre lies
off the grid and padding slots are not targets. A batch without boxes still trains the heatmap (all background).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from xmodal.errors import DataError
from xmodal.losses.base import DistillLoss, LossOutput, Need, Outputs, register_loss
from xmodal.nn.bev import BEV, BEV_BOX, REGRESSION, batch_boxes, centerpoint_targets, focal_loss, tokens_to_map


@register_loss("centerpoint")
class CenterPointLoss(DistillLoss):
    """focal(heatmap) + `regression_weight` · L1(offset, z, log size, sin/cos yaw) at the centre cells."""

    def __init__(self, key: str = BEV, box_key: str = BEV_BOX, regression_weight: float = 0.25,
                 radius_scale: float = 0.5, min_radius: float = 2.0):
        super().__init__()
        self.key, self.box_key = key, box_key
        self.regression_weight, self.radius_scale, self.min_radius = regression_weight, radius_scale, min_radius

    def needs(self) -> list[Need]:
        return [Need("student", self.key, "logits"), Need("student", self.box_key, "tokens")]

    def batch_keys(self) -> list[str]:
        return ["boxes", "box_labels", "box_mask", "bev_grid"]

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        boxes, mask, grid = batch_boxes(batch, f"loss '{self.name}'")
        if "box_labels" not in batch:
            raise DataError(f"loss '{self.name}' reads batch['box_labels'], but the batch has keys: {', '.join(batch)}")
        logits = self.pick_field(student, self.key, "student", "logits").logits
        reg = self.pick_field(student, self.box_key, "student", "tokens").tokens
        heat = tokens_to_map(logits, grid, f"loss '{self.name}': heatmap logits")
        reg_map = tokens_to_map(reg, grid, f"loss '{self.name}': regression")
        if reg_map.shape[1] != len(REGRESSION):
            raise DataError(f"loss '{self.name}': regression has {reg_map.shape[1]} channels, expected "
                            f"{len(REGRESSION)} ({', '.join(REGRESSION)})")
        dev = heat.device
        t = centerpoint_targets(boxes.to(dev).float(), batch["box_labels"].to(dev), mask.to(dev), grid,
                                heat.shape[1], self.radius_scale, self.min_radius)
        cls = focal_loss(heat, t["heatmap"])
        pred = reg_map.flatten(2).float().gather(2, t["index"][:, None].expand(-1, len(REGRESSION), -1))  # [B, 8, N]
        diff = (pred.transpose(1, 2) - t["regression"]).abs().sum(-1)  # [B, N]
        valid = t["valid"]
        box = torch.where(valid, diff, torch.zeros_like(diff)).sum() / valid.sum().clamp_min(1)
        return LossOutput(cls + self.regression_weight * box,
                          {"heatmap": cls.detach(), "regression": box.detach(), "boxes": valid.sum().float()})

"""BEV building blocks shared by teachers and students: how BEV maps travel as Features, box geometry on the grid.

A BEV detector's outputs are three Features (all maps on one `BEVGrid`, flattened row-major to tokens
[B, H·W, C] so the engine, the teacher cache and DDP treat them like any other tokens; pooled = cell mean):

- "bev"          backbone-output map (UniDistill relation) with the head's class heatmap logits [B, H·W, K]
- "bev_encoder"  encoder-output map, before the 2D backbone (UniDistill feature)
- "bev_box"      the head's box regression [B, H·W, 8] (`REGRESSION` channels)

"bev" and "bev_encoder" carry a projected view (1×1 convolution = Linear per cell) when a student's width
differs from its teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xmodal.data.bev import BEVGrid
from xmodal.errors import ConfigError, DataError
from xmodal.features import Features

BEV = "bev"
BEV_ENCODER = "bev_encoder"
BEV_BOX = "bev_box"
REGRESSION = ("offset_u", "offset_v", "z", "log_l", "log_w", "log_h", "sin_yaw", "cos_yaw")


# ----------------------------------------------------------------------------------------------- maps as Features


def map_to_tokens(m: Tensor) -> Tensor:
    """[B, C, H, W] → [B, H·W, C] (row-major cells)."""
    return m.flatten(2).transpose(1, 2)


def map_features(m: Tensor, logits: Tensor | None = None) -> Features:
    """Features of a BEV map: tokens = cells, pooled = their mean, logits = a per-cell map [B, K, H, W] flattened."""
    tokens = map_to_tokens(m)
    return Features(pooled=tokens.mean(1), tokens=tokens, logits=None if logits is None else map_to_tokens(logits))


def tokens_to_map(tokens: Tensor, grid: BEVGrid, what: str = "features") -> Tensor:
    """[B, H·W, C] → [B, C, H, W] on `grid`; a token count that is not the grid's names both."""
    h, w = grid.shape
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ConfigError(f"{what}: {list(tokens.shape)} does not hold one token per cell of the {h}x{w} BEV grid "
                          f"{grid.to_dict()}; teacher, student and data must share one grid (x_range, y_range, cell)")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


# ----------------------------------------------------------------------------------------------- box geometry


KEYPOINT_OFFSETS = torch.tensor([  # (along length, along width) in half-sizes: 4 corners, 4 edge midpoints, centre
    [1, 1], [-1, 1], [-1, -1], [1, -1],
    [1, 0], [0, 1], [-1, 0], [0, -1],
    [0, 0],
], dtype=torch.float32)


def box_keypoints(boxes: Tensor) -> Tensor:
    """Nine BEV keypoints per box [..., 7] → metric (x, y) [..., 9, 2]: four corners, four edge midpoints, centre."""
    half = boxes[..., None, 3:5] / 2  # [..., 1, 2]
    local = KEYPOINT_OFFSETS.to(boxes) * half  # [..., 9, 2]
    c, s = torch.cos(boxes[..., 6, None]), torch.sin(boxes[..., 6, None])
    x = boxes[..., None, 0] + c * local[..., 0] - s * local[..., 1]
    y = boxes[..., None, 1] + s * local[..., 0] + c * local[..., 1]
    return torch.stack([x, y], dim=-1)


def sample_keypoints(m: Tensor, boxes: Tensor, grid: BEVGrid) -> Tensor:
    """Bilinear samples of map [B, C, H, W] at each box's nine keypoints → [B, C, N, 9] (zeros off the grid)."""
    pts = grid.to_normalized(box_keypoints(boxes.to(m.dtype)))  # [B, N, 9, 2]
    return F.grid_sample(m, pts, mode="bilinear", padding_mode="zeros", align_corners=False)


def box_sigma(boxes: Tensor, scale: float, minimum: float) -> Tensor:
    """Gaussian spread (metres) around each box centre: `scale` × half the BEV diagonal, at least `minimum`."""
    return (torch.hypot(boxes[..., 3], boxes[..., 4]) / 2 * scale).clamp_min(minimum)


def gaussian_masks(boxes: Tensor, grid: BEVGrid, sigma: Tensor) -> Tensor:
    """exp(−d² / 2σ²) of every cell centre's distance d to each box centre: [B, N, H·W] (row-major cells)."""
    centers = grid.cell_centers(boxes.device).reshape(1, 1, -1, 2).to(boxes.dtype)
    d2 = ((centers - boxes[..., None, :2]) ** 2).sum(-1)  # [B, N, H·W]
    return torch.exp(-d2 / (2 * sigma[..., None] ** 2))


def batch_boxes(batch: object, who: str) -> tuple[Tensor, Tensor, BEVGrid]:
    """(boxes [B, N, 7], box_mask [B, N], grid) of a BEV batch, with an error naming what is missing."""
    from collections.abc import Mapping

    if not isinstance(batch, Mapping):
        raise DataError(f"{who} reads boxes from the batch, but got no batch")
    missing = [k for k in ("boxes", "box_mask", "bev_grid") if k not in batch]
    if missing:
        raise DataError(f"{who} reads batch[{', '.join(repr(k) for k in missing)}] (from BEVSceneDataset.collate with "
                        f"a grid), but the batch has keys: {', '.join(batch)}")
    boxes, mask, grid = batch["boxes"], batch["box_mask"], batch["bev_grid"]
    if not isinstance(grid, BEVGrid):
        raise DataError(f"{who}: batch['bev_grid'] must be a BEVGrid, got {type(grid).__name__}")
    if boxes.dim() != 3 or boxes.shape[-1] != 7 or tuple(mask.shape) != tuple(boxes.shape[:2]):
        raise DataError(f"{who}: batch['boxes'] must be [B, N, 7] with box_mask [B, N], got {list(boxes.shape)} "
                        f"and {list(mask.shape)}")
    mask = mask.bool()
    real = boxes[mask]
    if real.numel() and (not torch.isfinite(real).all() or (real[:, 3:6] <= 0).any()):
        raise DataError(f"{who}: a real box has a NaN/infinite value or a non-positive size")
    unit = boxes.new_tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    boxes = torch.where(mask[..., None], boxes, unit)  # padding slots hold a harmless unit box, whatever was there
    return boxes, mask, grid


def decode_yaw(sin: Tensor, cos: Tensor) -> Tensor:
    return torch.atan2(sin, cos)


__all__ = [
    "BEV",
    "BEV_BOX",
    "BEV_ENCODER",
    "KEYPOINT_OFFSETS",
    "REGRESSION",
    "batch_boxes",
    "box_keypoints",
    "box_sigma",
    "decode_yaw",
    "gaussian_masks",
    "map_features",
    "map_to_tokens",
    "sample_keypoints",
    "tokens_to_map",
]

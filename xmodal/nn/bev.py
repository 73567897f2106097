"""BEV building blocks shared by teachers and students: BEV maps as Features, box geometry on the grid, the LiDAR
pillar encoder, the camera lift-splat encoder, a 2D BEV backbone, the CenterPoint head, its targets and decoding,
the registered BEV adapters ("bev_lidar", "bev_camera") and the detector that joins them.

A BEV detector's outputs are three Features (all maps on one `BEVGrid`, flattened row-major to tokens
[B, H·W, C] so the engine, the teacher cache and DDP treat them like any other tokens; pooled = cell mean):

- "bev"          backbone-output map (UniDistill relation) with the head's class heatmap logits [B, H·W, K]
- "bev_encoder"  encoder-output map, before the 2D backbone (UniDistill feature)
- "bev_box"      the head's box regression [B, H·W, 8] (`REGRESSION` channels)

"bev" and "bev_encoder" carry a projected view (1×1 convolution = Linear per cell) when a student's width
differs from its teacher's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.adapters.base import ADAPTERS, ModalityAdapter
from xmodal.data.bev import CLASSES, BEVGrid
from xmodal.errors import CheckpointError, ConfigError, DataError
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


def _norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(conv, _norm(cout), nn.ReLU(inplace=True))


def _check_grid(batch: Mapping[str, Any], grid: BEVGrid, who: str) -> None:
    have = batch.get("bev_grid") if isinstance(batch, Mapping) else None
    if have is not None and have != grid:
        raise ConfigError(f"{who} works on the BEV grid {grid.to_dict()} but the batch is on {have.to_dict()}; "
                          "teacher, student and data must share one grid")


# ----------------------------------------------------------------------------------------------- LiDAR encoder


class PillarEncoder(nn.Module):
    """PointPillars-style: each point gets (x, y, z, intensity, offset from its cell centre, z above the pillar's
    mean), a shared MLP, then a max over the points of each cell → [B, C, H, W]. Padding points and points outside
    the grid are dropped; an empty cell is zero."""

    def __init__(self, grid: BEVGrid, channels: int = 32, hidden: int = 32):
        super().__init__()
        self.grid, self.out_channels = grid, channels
        self.mlp = nn.Sequential(nn.Linear(8, hidden), nn.LayerNorm(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, channels), nn.ReLU(inplace=True))

    def forward(self, points: Tensor, mask: Tensor | None = None) -> Tensor:
        if points.dim() != 3 or points.shape[-1] != 4:
            raise DataError(f"LiDAR points must be [B, P, 4] (x, y, z, intensity), got {list(points.shape)}")
        b, p, _ = points.shape
        h, w = self.grid.shape
        points = points.float()
        valid = self.grid.contains(points[..., :2]) & torch.isfinite(points).all(-1)
        if mask is not None:
            valid &= mask.bool()
        uv = self.grid.to_grid(points[..., :2])
        col = uv[..., 0].floor().clamp(0, w - 1).long()
        row = uv[..., 1].floor().clamp(0, h - 1).long()
        dump = b * h * w  # one extra slot collects dropped points
        index = torch.where(valid, torch.arange(b, device=points.device)[:, None] * h * w + row * w + col, dump)
        flat = index.reshape(-1)
        z = torch.where(valid, points[..., 2], 0.0).reshape(-1)
        count = torch.zeros(dump + 1, device=points.device).index_add_(0, flat, valid.reshape(-1).float())
        z_mean = torch.zeros(dump + 1, device=points.device).index_add_(0, flat, z) / count.clamp_min(1)
        extent = points.new_tensor([self.grid.x_range[1] - self.grid.x_range[0],
                                    self.grid.y_range[1] - self.grid.y_range[0]])
        origin = points.new_tensor([self.grid.x_range[0], self.grid.y_range[0]])
        feats = torch.cat([
            (points[..., :2] - origin) / extent * 2 - 1,
            points[..., 2:4],
            uv - uv.floor() - 0.5,
            (points[..., 2] - z_mean[index])[..., None],
            torch.ones_like(points[..., :1]),
        ], dim=-1)
        x = self.mlp(torch.where(valid[..., None], feats, 0.0)).reshape(b * p, -1)
        out = torch.zeros(dump + 1, x.shape[1], device=x.device, dtype=x.dtype)
        out = out.scatter_reduce(0, flat[:, None].expand_as(x), x, reduce="amax", include_self=True)
        return out[:dump].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- camera encoder


class ImageBackbone(nn.Module):
    """A small stride-8 CNN: [B, 3, H, W] in [0, 1] → [B, C, H/8, W/8]."""

    def __init__(self, channels: int = 64):
        super().__init__()
        c = channels
        self.out_channels, self.stride = c, 8
        self.net = nn.Sequential(conv_bn(3, c // 4, 2), conv_bn(c // 4, c // 4), conv_bn(c // 4, c // 2, 2),
                                 conv_bn(c // 2, c // 2), conv_bn(c // 2, c, 2), conv_bn(c, c))

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image - 0.5)


class LiftSplatEncoder(nn.Module):
    """Lift-Splat-Shoot: per image feature a learned distribution over `depth_bins` depths lifts context features
    to a frustum of 3D points (`intrinsics`, `cam_to_ego`), which are sum-pooled into the BEV cells they fall in.
    Frustum points outside the grid are dropped."""

    def __init__(self, grid: BEVGrid, channels: int = 32, image_channels: int = 64,
                 depth: tuple[float, float] = (2.0, 36.0), depth_bins: int = 34):
        super().__init__()
        if not 0 < depth[0] < depth[1] or depth_bins < 2:
            raise ConfigError(f"camera depth range must be 0 < min < max with at least 2 bins, got {depth}, "
                              f"{depth_bins} bins")
        self.grid, self.out_channels, self.depth_bins = grid, channels, depth_bins
        self.image = ImageBackbone(image_channels)
        self.depth_context = nn.Conv2d(image_channels, depth_bins + channels, 1)
        self.register_buffer("depths", torch.linspace(depth[0], depth[1], depth_bins), persistent=False)

    def frustum(self, intrinsics: Tensor, cam_to_ego: Tensor, feat_hw: tuple[int, int],
                image_hw: tuple[int, int]) -> Tensor:
        """Ego-frame (x, y, z) of every (depth bin, feature row, feature column): [B, D, h, w, 3]."""
        h, w = feat_hw
        sy, sx = image_hw[0] / h, image_hw[1] / w
        dev = intrinsics.device
        v, u = torch.meshgrid((torch.arange(h, device=dev) + 0.5) * sy, (torch.arange(w, device=dev) + 0.5) * sx,
                              indexing="ij")
        pix = torch.stack([u, v, torch.ones_like(u)], -1)  # [h, w, 3]
        rays = torch.einsum("bij,hwj->bhwi", torch.linalg.inv(intrinsics.float()), pix)  # camera frame, z = 1
        cam = rays[:, None] * self.depths[None, :, None, None, None]  # [B, D, h, w, 3]
        rot, trans = cam_to_ego[:, :3, :3].float(), cam_to_ego[:, :3, 3].float()
        return torch.einsum("bij,bdhwj->bdhwi", rot, cam) + trans[:, None, None, None]

    def forward(self, image: Tensor, intrinsics: Tensor, cam_to_ego: Tensor) -> Tensor:
        b = image.shape[0]
        feats = self.image(image)
        fh, fw = feats.shape[-2:]
        dc = self.depth_context(feats)
        depth = dc[:, :self.depth_bins].softmax(dim=1)  # [B, D, h, w]
        context = dc[:, self.depth_bins:]  # [B, C, h, w]
        volume = depth[:, :, None] * context[:, None]  # [B, D, C, h, w]
        geom = self.frustum(intrinsics, cam_to_ego, (fh, fw), tuple(image.shape[-2:]))  # [B, D, h, w, 3]
        gh, gw = self.grid.shape
        valid = self.grid.contains(geom[..., :2])
        uv = self.grid.to_grid(geom[..., :2])
        col = uv[..., 0].floor().clamp(0, gw - 1).long()
        row = uv[..., 1].floor().clamp(0, gh - 1).long()
        dump = b * gh * gw
        index = torch.where(valid, torch.arange(b, device=image.device)[:, None, None, None] * gh * gw + row * gw + col,
                            dump)
        x = volume.permute(0, 1, 3, 4, 2).reshape(-1, volume.shape[2])  # [B·D·h·w, C]
        out = torch.zeros(dump + 1, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, index.reshape(-1), x)
        return out[:dump].reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- BEV backbone and head


class BEVBackbone(nn.Module):
    """Two scales: a full-resolution block and a stride-2 block, upsampled and fused back to [B, C, H, W]."""

    def __init__(self, in_channels: int, channels: int = 64):
        super().__init__()
        self.out_channels = channels
        self.block1 = nn.Sequential(conv_bn(in_channels, channels), conv_bn(channels, channels))
        self.block2 = nn.Sequential(conv_bn(channels, 2 * channels, 2), conv_bn(2 * channels, 2 * channels))
        self.fuse = conv_bn(3 * channels, channels, kernel=1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.block1(x)
        b = F.interpolate(self.block2(a), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([a, b], dim=1))


class CenterPointHead(nn.Module):
    """Per-class centre heatmap logits [B, K, H, W] and box regression [B, 8, H, W] (`REGRESSION` channels)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.shared = conv_bn(in_channels, channels)
        self.heatmap = nn.Sequential(conv_bn(channels, channels), nn.Conv2d(channels, num_classes, 1))
        self.regression = nn.Sequential(conv_bn(channels, channels), nn.Conv2d(channels, len(REGRESSION), 1))
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # sigmoid ≈ 0.1: CenterNet's prior

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.shared(x)
        return self.heatmap(x), self.regression(x)


# ----------------------------------------------------------------------------------------------- targets and decoding


def center_radius(boxes: Tensor, grid: BEVGrid, scale: float = 0.5, minimum: float = 2.0) -> Tensor:
    """Heatmap radius (cells) per box: `scale` × half its BEV diagonal in cells, at least `minimum`."""
    return (torch.hypot(boxes[..., 3], boxes[..., 4]) / 2 / grid.cell * scale).floor().clamp_min(minimum)


def centerpoint_targets(boxes: Tensor, labels: Tensor, mask: Tensor, grid: BEVGrid, num_classes: int,
                        radius_scale: float = 0.5, min_radius: float = 2.0) -> dict[str, Tensor]:
    """CenterPoint targets: `heatmap` [B, K, H, W] (per class, the max of Gaussians of σ = (2r+1)/6 cells centred
    on each box's centre cell, exactly 1 there), and per box `index` [B, N] (flat centre cell), `regression`
    [B, N, 8] and `valid` [B, N] (a real box whose centre lies on the grid)."""
    h, w = grid.shape
    uv = grid.to_grid(boxes[..., :2])
    col, row = uv[..., 0].floor(), uv[..., 1].floor()
    valid = mask.bool() & (col >= 0) & (col < w) & (row >= 0) & (row < h) & (labels >= 0) & (labels < num_classes)
    col, row = col.clamp(0, w - 1), row.clamp(0, h - 1)
    sigma = (2 * center_radius(boxes, grid, radius_scale, min_radius) + 1) / 6  # [B, N]
    jj = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    ii = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    d2 = (ii[None, None, :, None] - row[..., None, None]) ** 2 + (jj[None, None, None, :] - col[..., None, None]) ** 2
    g = torch.exp(-d2 / (2 * sigma[..., None, None] ** 2)) * valid[..., None, None]  # [B, N, H, W]
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).to(g.dtype) * valid[..., None]  # [B, N, K]
    heatmap = (g[:, :, None] * onehot[..., None, None]).amax(dim=1) if boxes.shape[1] else \
        boxes.new_zeros(boxes.shape[0], num_classes, h, w)
    safe = torch.where(valid[..., None], boxes, boxes.new_tensor([0, 0, 0.5, 1, 1, 1, 0]))
    regression = torch.cat([
        torch.stack([uv[..., 0] - col, uv[..., 1] - row, safe[..., 2]], -1),
        safe[..., 3:6].log(),
        torch.stack([torch.sin(safe[..., 6]), torch.cos(safe[..., 6])], -1),
    ], dim=-1)
    return {"heatmap": heatmap, "index": (row * w + col).long(), "regression": regression, "valid": valid}


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """CenterNet's penalty-reduced focal loss on heatmap logits, summed and divided by the number of centres."""
    logits = logits.float()
    pos = target >= 1 - 1e-4
    log_p, log_1p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = -((1 - p) ** alpha * log_p)[pos].sum()
    neg_loss = -((1 - target) ** beta * p**alpha * log_1p)[~pos].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp_min(1)


@dataclass
class DecodeConfig:
    """Detection decoding: heatmap peaks (3×3 max), top-k, score threshold, then circular NMS per class with
    a radius (metres) per class (CenterPoint's circle NMS)."""

    top_k: int = 50
    score_threshold: float = 0.1
    nms_radius: tuple[float, ...] = (1.5, 0.4, 0.8)  # car, pedestrian, cyclist
    max_log_size: float = 3.0  # exp(3) = 20 m: a regression that has not converged stays finite


def circle_nms(xy: Tensor, scores: Tensor, labels: Tensor, radius: Tensor) -> Tensor:
    """Indices kept by greedy circular NMS: in descending score order, a box suppresses the later boxes of its class
    whose centres lie within its class radius."""
    order = scores.argsort(descending=True)
    xy, labels = xy[order], labels[order]
    close = (torch.cdist(xy, xy) < radius[labels][:, None]) & (labels[:, None] == labels[None, :])
    keep = torch.ones(len(order), dtype=torch.bool, device=xy.device)
    for i in range(len(order)):
        if keep[i]:
            later = close[i].clone()
            later[: i + 1] = False
            keep &= ~later
    return order[keep]


def decode_boxes(heat_logits: Tensor, regression: Tensor, grid: BEVGrid, cfg: DecodeConfig | None = None
                 ) -> list[dict[str, Tensor]]:
    """Per sample {"boxes" [M, 7], "scores" [M], "labels" [M]} from heatmap logits [B, K, H, W] and regression
    [B, 8, H, W]: peaks, top-k, threshold, circular NMS."""
    cfg = cfg or DecodeConfig()
    b, k, h, w = heat_logits.shape
    if len(cfg.nms_radius) < k:
        raise ConfigError(f"decode.nms_radius gives {len(cfg.nms_radius)} radii for {k} classes")
    heat = torch.sigmoid(heat_logits.float())
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    scores, idx = peaks.reshape(b, -1).topk(min(cfg.top_k, k * h * w), dim=1)
    labels, cell = idx // (h * w), idx % (h * w)
    row, col = cell // w, cell % w
    reg = regression.float().reshape(b, regression.shape[1], -1).gather(
        2, cell[:, None].expand(-1, regression.shape[1], -1)).transpose(1, 2)  # [B, k, 8]
    x = grid.x_range[0] + (col + reg[..., 0]) * grid.cell
    y = grid.y_range[0] + (row + reg[..., 1]) * grid.cell
    size = reg[..., 3:6].clamp(-cfg.max_log_size, cfg.max_log_size).exp()
    yaw = decode_yaw(reg[..., 6], reg[..., 7])
    boxes = torch.cat([torch.stack([x, y, reg[..., 2]], -1), size, yaw[..., None]], -1)
    radius = heat.new_tensor(cfg.nms_radius)
    out = []
    for i in range(b):
        keep = scores[i] >= cfg.score_threshold
        bx, sc, lb = boxes[i][keep], scores[i][keep], labels[i][keep]
        kept = circle_nms(bx[:, :2], sc, lb, radius)
        out.append({"boxes": bx[kept], "scores": sc[kept], "labels": lb[kept]})
    return out


# ----------------------------------------------------------------------------------------------- adapters


class BEVEncoder(nn.Module):
    """A sensor encoder to the BEV grid followed by the 2D backbone: batch → (encoder map, backbone map)."""

    def __init__(self, view: nn.Module, backbone: BEVBackbone, reads: tuple[str, ...]):
        super().__init__()
        self.view, self.backbone, self.reads = view, backbone, reads

    def forward(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        enc = self.view(*(batch.get(k) for k in self.reads))
        return enc, self.backbone(enc)


class BEVAdapter(ModalityAdapter):
    """Modality "bev": a sensor's BEV encoder + backbone. `encode` gives the backbone map as Features;
    `maps` gives (encoder map, backbone map) [B, C, H, W] for a detector and the UniDistill losses."""

    modality = "bev"

    def __init__(self, encoder: BEVEncoder, grid: BEVGrid, *, frozen: bool = False, batch_key: str | None = None):
        super().__init__(encoder, encoder.backbone.out_channels, frozen=frozen, batch_key=batch_key)
        self.grid = grid

    def maps(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        self.inputs(batch)  # names the missing key
        _check_grid(batch, self.grid, type(self).__name__)
        return self.encoder(batch)

    def encode(self, batch: Mapping[str, Any]) -> Features:
        return map_features(self.maps(batch)[1])


@ADAPTERS.register("bev_lidar")
class LidarBEVAdapter(BEVAdapter):
    """batch["points"] [B, P, 4] (+ "points_mask") → pillars → BEV backbone."""

    batch_key = "points"

    def __init__(self, grid: BEVGrid, channels: int = 32, backbone_channels: int = 64, *, frozen: bool = False):
        enc = BEVEncoder(PillarEncoder(grid, channels), BEVBackbone(channels, backbone_channels),
                         ("points", "points_mask"))
        super().__init__(enc, grid, frozen=frozen)


@ADAPTERS.register("bev_camera")
class CameraBEVAdapter(BEVAdapter):
    """batch["image"] [B, 3, H, W] with "intrinsics" and "cam_to_ego" → lift-splat → BEV backbone."""

    batch_key = "image"

    def __init__(self, grid: BEVGrid, channels: int = 32, backbone_channels: int = 64, *, image_channels: int = 64,
                 depth: tuple[float, float] = (2.0, 36.0), depth_bins: int = 34, frozen: bool = False):
        enc = BEVEncoder(LiftSplatEncoder(grid, channels, image_channels, depth, depth_bins),
                         BEVBackbone(channels, backbone_channels), ("image", "intrinsics", "cam_to_ego"))
        super().__init__(enc, grid, frozen=frozen)

    def maps(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        missing = [k for k in ("intrinsics", "cam_to_ego") if k not in batch]
        if missing:
            raise DataError(f"CameraBEVAdapter reads the calibration batch[{', '.join(map(repr, missing))}] too, but "
                            f"the batch has keys: {', '.join(batch)}")
        return super().maps(batch)


# ----------------------------------------------------------------------------------------------- the detector


SENSORS = {"lidar": "bev_lidar", "camera": "bev_camera"}


@dataclass
class BEVDetectorConfig:
    """A BEV detector: `sensor` picks the adapter ("lidar" or "camera"); every map lies on `grid`."""

    sensor: str = "lidar"
    grid: BEVGrid = field(default_factory=BEVGrid)
    classes: tuple[str, ...] = CLASSES
    channels: int = 32  # encoder-output map
    backbone_channels: int = 64
    head_channels: int = 64
    image_channels: int = 64  # camera only
    depth: tuple[float, float] = (2.0, 36.0)  # camera only: depth range (metres) of the lift
    depth_bins: int = 34

    def __post_init__(self) -> None:
        if self.sensor not in SENSORS:
            from xmodal.registry import suggest

            raise ConfigError(f"unknown sensor '{self.sensor}'{suggest(self.sensor, list(SENSORS))}; "
                              f"choose from {', '.join(SENSORS)}")
        if isinstance(self.grid, Mapping):
            self.grid = BEVGrid(**self.grid)
        self.classes = tuple(self.classes)
        if min(self.channels, self.backbone_channels, self.head_channels, self.image_channels) < 4:
            raise ConfigError("detector channel widths must be at least 4")


class BEVDetector(nn.Module):
    """Adapter + CenterPoint head: batch → {"bev", "bev_encoder", "bev_box"} Features (see the module docstring).

    `project_to(widths)` gives the "bev" / "bev_encoder" outputs a projected view (a per-cell Linear, i.e. a 1×1
    convolution) into a teacher's widths; it trains with the student and is skipped by detection.
    """

    def __init__(self, cfg: BEVDetectorConfig):
        super().__init__()
        self.config = cfg
        kw: dict[str, Any] = {"channels": cfg.channels, "backbone_channels": cfg.backbone_channels}
        if cfg.sensor == "camera":
            kw.update(image_channels=cfg.image_channels, depth=tuple(cfg.depth), depth_bins=cfg.depth_bins)
        self.adapter: BEVAdapter = ADAPTERS.build(SENSORS[cfg.sensor], grid=cfg.grid, **kw)
        self.head = CenterPointHead(cfg.backbone_channels, len(cfg.classes), cfg.head_channels)
        self.projections = nn.ModuleDict()

    @property
    def grid(self) -> BEVGrid:
        return self.config.grid

    @property
    def widths(self) -> dict[str, int]:
        return {BEV: self.config.backbone_channels, BEV_ENCODER: self.config.channels}

    def project_to(self, widths: Mapping[str, int], *, always: bool = False) -> None:
        """Add a projection for each key whose width differs from `widths[key]` (every key when `always`)."""
        for key, width in widths.items():
            if key not in self.widths:
                raise ConfigError(f"no BEV map '{key}' to project; maps: {', '.join(self.widths)}")
            if always or width != self.widths[key]:
                self.projections[key] = nn.Linear(self.widths[key], int(width))

    def heads(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(encoder map, backbone map, heatmap logits, regression) as maps."""
        enc, bb = self.adapter.maps(batch)
        heat, reg = self.head(bb)
        return enc, bb, heat, reg

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        enc, bb, heat, reg = self.heads(batch)
        out = {BEV: map_features(bb, heat), BEV_ENCODER: map_features(enc), BEV_BOX: map_features(reg)}
        for key, proj in self.projections.items():
            f = out[key]
            out[key] = f.replace(projected=Features(pooled=proj(f.pooled), tokens=proj(f.tokens)))
        return out

    @torch.no_grad()
    def detect(self, batch: Mapping[str, Any], cfg: DecodeConfig | None = None) -> list[dict[str, Tensor]]:
        """Decoded boxes per sample (call in eval mode)."""
        _, _, heat, reg = self.heads(batch)
        return decode_boxes(heat, reg, self.grid, cfg)


def save_detector(model: BEVDetector, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
    """Write {"kind": "bev_detector", "config", "model", "meta"} atomically (projections are not kept: they belong
    to a distillation run, not to the detector)."""
    from xmodal.config import to_dict
    from xmodal.io import atomic_torch_save

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("projections.")}
    atomic_torch_save({"kind": "bev_detector", "config": to_dict(model.config), "model": state,
                       "meta": to_dict(dict(meta or {}))}, path)


def load_detector(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                  return_meta: bool = False) -> BEVDetector | tuple[BEVDetector, dict]:
    """Rebuild a detector (eval mode) from a `save_detector` file, loading tensors only."""
    from xmodal.config import from_dict
    from xmodal.weights import load_weights

    ckpt = load_weights(path, map_location=map_location, what="BEV detector file")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "bev_detector" or not {"config", "model"} <= set(ckpt):
        raise CheckpointError(f"{path} is not a BEV detector file (expected kind 'bev_detector' with config and model)")
    model = BEVDetector(from_dict(BEVDetectorConfig, ckpt["config"], source=str(path)))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the detector config stored with them: {e}") from e
    model.eval()
    return (model, dict(ckpt.get("meta") or {})) if return_meta else model


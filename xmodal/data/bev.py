"""synthetic-bev: seeded driving scenes for bird's-eye-view detection, their files on disk and the data set over them.

A scene is a flat ground plane with cars, pedestrians and cyclists (each class its own size range and colour) at
random positions and headings in front of the ego vehicle. A roof LiDAR sweep is ray cast against the boxes and
the ground (occlusion, range noise, dropout) and a front pinhole camera renders shaded boxes on a textured road,
also by ray casting, so both sensors see the same occlusions. Labels are 3D boxes (centre, size, yaw, class).

Frames: the ego frame is x forward, y left, z up, metres, ground at z = 0; points are stored in the ego frame.
A box is (x, y, z, l, w, h, yaw) with (x, y, z) its centre, l along its heading, yaw counter-clockwise from +x.
Camera frame: x right, y down, z forward (OpenCV); `cam_to_ego` maps camera coordinates to the ego frame.

Layout of a data set folder (written by `generate_bev_dataset` / `xmodal data synth-bev`):
  dataset.json            name, version, seed, settings, classes, scene ids (written last: marks it complete)
  points/<id>.npy         float32 [P, 4]: x, y, z, intensity (ego frame)
  images/<camera>/<id>.png
  labels/<id>.json        boxes and calibration
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from xmodal.errors import ConfigError, DataError
from xmodal.io import record_matches

log = logging.getLogger(__name__)

WORLD_NAME = "synthetic-bev"
WORLD_VERSION = 1
BOX_DIM = 7  # x, y, z, l, w, h, yaw
CAMERA = "front"


@dataclass(frozen=True)
class ObjectClass:
    """One object class: size ranges (metres), body colour (RGB) and LiDAR reflectance."""

    name: str
    length: tuple[float, float]
    width: tuple[float, float]
    height: tuple[float, float]
    color: tuple[int, int, int]
    reflectance: float


OBJECT_CLASSES: dict[str, ObjectClass] = {
    "car": ObjectClass("car", (3.8, 4.8), (1.7, 2.0), (1.4, 1.7), (40, 90, 200), 0.7),
    "pedestrian": ObjectClass("pedestrian", (0.5, 0.8), (0.5, 0.8), (1.6, 1.9), (210, 50, 50), 0.3),
    "cyclist": ObjectClass("cyclist", (1.6, 1.9), (0.5, 0.8), (1.5, 1.8), (50, 170, 60), 0.5),
}
CLASSES = tuple(OBJECT_CLASSES)


# ----------------------------------------------------------------------------------------------- the BEV grid


@dataclass(frozen=True)
class BEVGrid:
    """The bird's-eye-view grid every BEV map lives on: a metric range of the ego frame cut into square cells.

    Map layout is [.., H, W] with rows along y (from y_min) and columns along x (from x_min); cell (i, j) covers
    x in [x_min + j·cell, x_min + (j+1)·cell). Grid coordinates (u, v) = ((x − x_min)/cell, (y − y_min)/cell),
    so a point lies in cell (floor(v), floor(u)) and a cell centre is at (j + ½, i + ½).
    """

    x_range: tuple[float, float] = (0.0, 32.0)
    y_range: tuple[float, float] = (-16.0, 16.0)
    cell: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "x_range", tuple(float(v) for v in self.x_range))
        object.__setattr__(self, "y_range", tuple(float(v) for v in self.y_range))
        object.__setattr__(self, "cell", float(self.cell))
        for name in ("x_range", "y_range"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not all(math.isfinite(v) for v in lo_hi) or lo_hi[0] >= lo_hi[1]:
                raise ConfigError(f"grid.{name} must be two finite numbers [min, max] with min < max, got {lo_hi}")
        if not math.isfinite(self.cell) or self.cell <= 0:
            raise ConfigError(f"grid.cell must be a positive number of metres, got {self.cell}")
        for name in ("x_range", "y_range"):
            lo, hi = getattr(self, name)
            n = (hi - lo) / self.cell
            if abs(n - round(n)) > 1e-6:
                raise ConfigError(f"grid.{name} {[lo, hi]} is not a whole number of {self.cell} m cells; "
                                  "change the range or grid.cell")

    @property
    def width(self) -> int:
        """W: cells along x."""
        return round((self.x_range[1] - self.x_range[0]) / self.cell)

    @property
    def height(self) -> int:
        """H: cells along y."""
        return round((self.y_range[1] - self.y_range[0]) / self.cell)

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def to_grid(self, xy: Tensor) -> Tensor:
        """Metric (x, y) [..., 2] → continuous grid coordinates (u, v) [..., 2]."""
        origin = xy.new_tensor([self.x_range[0], self.y_range[0]])
        return (xy - origin) / self.cell

    def to_normalized(self, xy: Tensor) -> Tensor:
        """Metric (x, y) → `grid_sample` coordinates in [-1, 1] (align_corners=False: ±1 are the outer edges)."""
        size = xy.new_tensor([self.width, self.height])
        return self.to_grid(xy) / size * 2 - 1

    def contains(self, xy: Tensor) -> Tensor:
        """Bool [...]: the point lies inside the grid."""
        x, y = xy[..., 0], xy[..., 1]
        return (x >= self.x_range[0]) & (x < self.x_range[1]) & (y >= self.y_range[0]) & (y < self.y_range[1])

    def cell_centers(self, device: torch.device | str | None = None) -> Tensor:
        """[H, W, 2] metric (x, y) of every cell centre."""
        xs = self.x_range[0] + (torch.arange(self.width, device=device, dtype=torch.float32) + 0.5) * self.cell
        ys = self.y_range[0] + (torch.arange(self.height, device=device, dtype=torch.float32) + 0.5) * self.cell
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx, gy], dim=-1)

    def to_dict(self) -> dict:
        return {"x_range": list(self.x_range), "y_range": list(self.y_range), "cell": self.cell}


# ----------------------------------------------------------------------------------------------- world settings


@dataclass(frozen=True)
class BEVWorldConfig:
    """Scene layout, LiDAR and camera settings; the defaults define `synthetic-bev`."""

    x_range: tuple[float, float] = (0.0, 32.0)  # where objects are placed (ego frame, metres)
    y_range: tuple[float, float] = (-16.0, 16.0)
    min_distance: float = 4.0  # nearest object centre ahead of the ego vehicle (closer ones leave the camera view)
    objects: tuple[int, int] = (3, 9)  # objects per scene, inclusive
    class_probs: tuple[float, ...] = (0.5, 0.25, 0.25)  # car, pedestrian, cyclist
    # LiDAR: a spinning sensor on the roof
    lidar_height: float = 1.8
    lidar_beams: int = 32
    lidar_elevation: tuple[float, float] = (-24.0, 4.0)  # degrees
    lidar_azimuths: int = 720  # rays per beam over 360°
    lidar_max_range: float = 60.0
    range_noise: float = 0.02  # metres (std)
    dropout: float = 0.05  # share of returns lost
    # camera: one forward pinhole camera
    image_size: tuple[int, int] = (96, 160)  # height, width
    camera_hfov: float = 90.0  # degrees
    camera_height: float = 1.6
    camera_pitch: float = 5.0  # degrees, positive looks down
    pixel_noise: float = 3.0  # per-pixel noise (std, 0-255 scale)

    def __post_init__(self) -> None:
        for name in ("x_range", "y_range", "objects", "class_probs", "lidar_elevation", "image_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.class_probs) != len(CLASSES) or min(self.class_probs) < 0 or sum(self.class_probs) <= 0:
            raise ConfigError(f"class_probs must be {len(CLASSES)} non-negative weights for {', '.join(CLASSES)}, "
                              f"got {list(self.class_probs)}")
        lo, hi = self.objects
        if not 0 <= lo <= hi:
            raise ConfigError(f"objects must be [min, max] counts with 0 <= min <= max, got {list(self.objects)}")
        if self.x_range[0] >= self.x_range[1] or self.y_range[0] >= self.y_range[1]:
            raise ConfigError(f"x_range/y_range must be [min, max] with min < max, got {self.x_range}, {self.y_range}")
        if not self.x_range[0] <= self.min_distance < self.x_range[1] - 2:
            raise ConfigError(f"min_distance {self.min_distance} must lie in x_range {list(self.x_range)} with 2 m "
                              "to spare")
        if self.lidar_beams < 1 or self.lidar_azimuths < 1:
            raise ConfigError("lidar_beams and lidar_azimuths must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ConfigError(f"image_size must be [height, width] of at least 8 pixels, got {list(self.image_size)}")
        if not 10 <= self.camera_hfov <= 150:
            raise ConfigError(f"camera_hfov must be between 10 and 150 degrees, got {self.camera_hfov}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BEVWorldConfig:
        from xmodal.registry import suggest

        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown synthetic-bev setting '{key}'{suggest(key, names)}")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------------- calibration


def camera_calibration(cfg: BEVWorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """(intrinsics K [3, 3], cam_to_ego [4, 4]) of the front camera."""
    h, w = cfg.image_size
    f = (w / 2) / math.tan(math.radians(cfg.camera_hfov) / 2)
    k = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=np.float64)
    p = math.radians(cfg.camera_pitch)
    # camera axes in the ego frame: x_c = right = -y, z_c = forward pitched down, y_c = down
    forward = np.array([math.cos(p), 0.0, -math.sin(p)])
    right = np.array([0.0, -1.0, 0.0])
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward], axis=1)  # columns: camera axes in ego coordinates
    ext = np.eye(4)
    ext[:3, :3] = rot
    ext[:3, 3] = [0.0, 0.0, cfg.camera_height]
    return k, ext


# ----------------------------------------------------------------------------------------------- scene sampling


@dataclass
class BEVScene:
    """One scene's truth: boxes [N, 7] (x, y, z, l, w, h, yaw), class indices [N] and its texture seed."""

    boxes: np.ndarray
    labels: np.ndarray
    texture_seed: int


def sample_scene(rng: np.random.Generator, cfg: BEVWorldConfig) -> BEVScene:
    """Objects at random non-overlapping places in the camera's view and the placement range, random headings."""
    n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    probs = np.asarray(cfg.class_probs, dtype=np.float64)
    probs = probs / probs.sum()
    half_fov = math.radians(cfg.camera_hfov) / 2 * 0.85
    boxes, labels = [], []
    for _ in range(n):
        c = int(rng.choice(len(CLASSES), p=probs))
        spec = OBJECT_CLASSES[CLASSES[c]]
        size = [rng.uniform(*spec.length), rng.uniform(*spec.width), rng.uniform(*spec.height)]
        radius = math.hypot(size[0], size[1]) / 2
        for _try in range(50):
            x = rng.uniform(max(cfg.min_distance, cfg.x_range[0] + radius), cfg.x_range[1] - radius)
            y_lim = min(x * math.tan(half_fov), cfg.y_range[1] - radius, -cfg.y_range[0] - radius)
            if y_lim <= 0:
                continue
            y = rng.uniform(max(-y_lim, cfg.y_range[0] + radius), min(y_lim, cfg.y_range[1] - radius))
            if all(math.hypot(x - b[0], y - b[1]) > radius + math.hypot(b[3], b[4]) / 2 + 0.3 for b in boxes):
                break
        else:
            continue  # no free place left: fewer objects
        yaw = rng.uniform(-math.pi, math.pi)
        boxes.append([x, y, size[2] / 2, size[0], size[1], size[2], yaw])
        labels.append(c)
    return BEVScene(np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM), np.asarray(labels, dtype=np.int64),
                    int(rng.integers(0, 2**31 - 1)))


# ----------------------------------------------------------------------------------------------- ray casting


def cast_rays(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray, max_range: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays from `origin` [3] along unit `dirs` [R, 3] against the ground (z = 0) and `boxes`.

    Returns (t [R] distance, inf for no hit within max_range; what [R] −1 ground, −2 nothing, else box index;
    normal [R, 3] of the surface hit, ego frame). Boxes are slab-tested in their own rotated frame.
    """
    r = dirs.shape[0]
    t = np.full(r, np.inf)
    what = np.full(r, -2, dtype=np.int64)
    normal = np.zeros((r, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        down = dirs[:, 2] < -1e-9
        tg = np.where(down, -origin[2] / np.where(down, dirs[:, 2], -1.0), np.inf)
    ground = tg < max_range
    t[ground], what[ground] = tg[ground], -1
    normal[ground] = [0.0, 0.0, 1.0]
    if len(boxes):
        c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])  # [N]
        rel = origin[None, :] - boxes[:, :3]  # [N, 3]
        # into each box frame: rotate by -yaw about z
        o_loc = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)  # [N, 3]
        d_loc = np.stack([dirs[:, None, 0] * c + dirs[:, None, 1] * s,
                          -dirs[:, None, 0] * s + dirs[:, None, 1] * c,
                          np.broadcast_to(dirs[:, None, 2], (r, len(boxes)))], -1)  # [R, N, 3]
        d_loc = np.where(np.abs(d_loc) < 1e-12, 1e-12, d_loc)
        half = boxes[:, 3:6] / 2  # [N, 3]
        t1 = (-half - o_loc) / d_loc
        t2 = (half - o_loc) / d_loc
        tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
        near, far = tmin.max(-1), tmax.min(-1)  # [R, N]
        hit = (near <= far) & (near > 1e-6)
        near = np.where(hit, near, np.inf)
        k = near.argmin(-1)
        tb = near[np.arange(r), k]
        closer = tb < np.minimum(t, max_range)
        t[closer], what[closer] = tb[closer], k[closer]
        axis = tmin[np.arange(r), k].argmax(-1)  # the face the ray enters through
        sign = -np.sign(d_loc[np.arange(r), k, axis])
        n_loc = np.zeros((r, 3))
        n_loc[np.arange(r), axis] = sign
        ck, sk = c[k], s[k]
        n_ego = np.stack([ck * n_loc[:, 0] - sk * n_loc[:, 1], sk * n_loc[:, 0] + ck * n_loc[:, 1], n_loc[:, 2]], -1)
        normal[closer] = n_ego[closer]
    return t, what, normal


def lidar_sweep(scene: BEVScene, cfg: BEVWorldConfig, rng: np.random.Generator) -> np.ndarray:
    """A 360° sweep: [P, 4] points (x, y, z, intensity) in the ego frame, with range noise and dropout."""
    elev = np.radians(np.linspace(cfg.lidar_elevation[0], cfg.lidar_elevation[1], cfg.lidar_beams))
    azim = np.linspace(-math.pi, math.pi, cfg.lidar_azimuths, endpoint=False)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    dirs = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1).reshape(-1, 3)
    origin = np.array([0.0, 0.0, cfg.lidar_height])
    t, what, _ = cast_rays(origin, dirs, scene.boxes, cfg.lidar_max_range)
    keep = np.isfinite(t) & (rng.random(t.shape[0]) >= cfg.dropout)
    t = t + rng.normal(0.0, cfg.range_noise, t.shape[0])
    pts = origin + dirs[keep] * t[keep, None]
    refl = np.array([OBJECT_CLASSES[name].reflectance for name in CLASSES])
    kind = what[keep]
    base = np.where(kind >= 0, refl[scene.labels[np.clip(kind, 0, None)]] if len(scene.labels) else 0.1, 0.1)
    intensity = np.clip(base + rng.normal(0.0, 0.05, kind.shape[0]), 0.0, 1.0)
    return np.concatenate([pts, intensity[:, None]], axis=1).astype(np.float32)


def render_camera(scene: BEVScene, cfg: BEVWorldConfig, rng: np.random.Generator) -> np.ndarray:
    """The front camera's image, uint8 [H, W, 3]: shaded boxes on a textured road under a sky gradient."""
    h, w = cfg.image_size
    k, ext = camera_calibration(cfg)
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
    rays_cam = pix @ np.linalg.inv(k).T
    dirs = rays_cam @ ext[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origin = ext[:3, 3]
    t, what, normal = cast_rays(origin, dirs, scene.boxes, 200.0)
    img = np.zeros((h * w, 3))
    # sky: brighter towards the horizon
    sky = what == -2
    img[sky] = np.array([120, 160, 215]) + (1 - np.clip(dirs[sky, 2:3] * 4, 0, 1)) * np.array([60, 50, 25])
    # ground: asphalt with a per-scene cell texture and dashed lane markings
    g = what == -1
    hit = origin + dirs[g] * t[g, None]
    tex = np.random.default_rng(scene.texture_seed).normal(0.0, 1.0, (64, 64))
    ci = np.floor(hit[:, 0] / 0.5).astype(np.int64) % 64
    cj = np.floor(hit[:, 1] / 0.5).astype(np.int64) % 64
    shade = 95 + 12 * tex[ci, cj] + 6 * np.sin(hit[:, 0] * 0.7) * np.cos(hit[:, 1] * 0.9)
    lane = (np.abs(np.mod(hit[:, 1], 3.5) - 1.75) < 0.1) & (np.mod(hit[:, 0], 6.0) < 3.0)
    ground = np.stack([shade, shade * 1.02, shade * 0.98], -1)
    ground[lane] = [225, 225, 215]
    fog = np.exp(-t[g] / 90.0)[:, None]
    img[g] = ground * fog + np.array([170, 180, 195]) * (1 - fog)
    # boxes: class colour (per-object tint) under a directional light, top faces brighter
    b = what >= 0
    if b.any():
        light = np.array([-0.4, 0.3, 0.85])
        light /= np.linalg.norm(light)
        lam = 0.35 + 0.65 * np.clip(normal[b] @ light, 0.0, 1.0)
        colors = np.array([OBJECT_CLASSES[CLASSES[c]].color for c in scene.labels], dtype=np.float64)
        tint = np.random.default_rng(scene.texture_seed + 1).integers(-25, 26, colors.shape)
        img[b] = np.clip(colors + tint, 0, 255)[what[b]] * lam[:, None]
    img += rng.normal(0.0, cfg.pixel_noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8).reshape(h, w, 3)


# ----------------------------------------------------------------------------------------------- writing


def scene_id(index: int) -> str:
    return f"{index:06d}"


def _scene_record(sid: str, scene: BEVScene, cfg: BEVWorldConfig) -> dict:
    k, ext = camera_calibration(cfg)
    boxes = [{"center": [round(float(v), 6) for v in b[:3]], "size": [round(float(v), 6) for v in b[3:6]],
              "yaw": round(float(b[6]), 6), "class": CLASSES[int(c)]} for b, c in zip(scene.boxes, scene.labels)]
    return {
        "id": sid,
        "boxes": boxes,
        "calibration": {
            "points_frame": "ego",
            "lidar": {"origin": [0.0, 0.0, cfg.lidar_height]},
            "cameras": {CAMERA: {"intrinsics": k.tolist(), "cam_to_ego": ext.tolist(),
                                 "image_size": list(cfg.image_size)}},
        },
    }


def _params(n_scenes: int, seed: int, cfg: BEVWorldConfig) -> dict:
    return {"name": WORLD_NAME, "version": WORLD_VERSION, "seed": int(seed), "scenes": int(n_scenes),
            "config": cfg.to_dict(), "classes": list(CLASSES)}


def _is_complete(out: Path, expected: dict) -> bool | None:
    """True when `out` holds exactly this data set, False when it holds another, None when it holds none."""
    matches = record_matches(out / "dataset.json", expected)
    if not matches:
        return matches
    return all((out / d).is_dir() for d in ("points", "labels", f"images/{CAMERA}"))


def generate_scene(index: int, seed: int, cfg: BEVWorldConfig) -> tuple[BEVScene, np.ndarray, np.ndarray]:
    """(scene, LiDAR points, camera image) of scene `index`: a pure function of (seed, index, settings)."""
    rng = np.random.default_rng([int(seed), int(index)])
    scene = sample_scene(rng, cfg)
    return scene, lidar_sweep(scene, cfg, rng), render_camera(scene, cfg, rng)


def generate_bev_dataset(out_dir: str | os.PathLike, n_scenes: int, seed: int = 0, cfg: BEVWorldConfig | None = None,
                         *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write `n_scenes` synthetic-bev scenes to `out_dir` (see the module docstring for the layout).

    Files go to a staging folder that replaces the data folders when complete; dataset.json, written last, marks
    the folder complete. Rerunning with the same settings on a complete folder does nothing; a folder holding
    another data set is refused unless `overwrite`.
    """
    from PIL import Image

    from xmodal.io import atomic_write_json, make_temp_dir
    from xmodal.progress import progress as progress_bar

    cfg = cfg or BEVWorldConfig()
    if int(n_scenes) != n_scenes or n_scenes < 1:
        raise ConfigError(f"the number of scenes must be a positive integer, got {n_scenes}")
    out = Path(out_dir)
    expected = _params(n_scenes, seed, cfg)
    state = _is_complete(out, expected)
    if state and not overwrite:
        log.info("%s already holds this synthetic-bev data set; nothing to do", out)
        return out
    if state is False and not overwrite:
        raise DataError(f"{out} holds a different synthetic-bev data set (see {out / 'dataset.json'}); choose "
                        "another output folder or pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)  # incomplete from here until rewritten
    staging = make_temp_dir(out, prefix=".staging-")
    try:
        for d in ("points", "labels", f"images/{CAMERA}"):
            (staging / d).mkdir(parents=True)
        ids = []
        for i in progress_bar(range(int(n_scenes)), desc=WORLD_NAME, unit="scene", enabled=progress):
            sid = scene_id(i)
            scene, points, image = generate_scene(i, seed, cfg)
            np.save(staging / "points" / f"{sid}.npy", points)
            Image.fromarray(image).save(staging / "images" / CAMERA / f"{sid}.png", format="PNG", compress_level=1)
            (staging / "labels" / f"{sid}.json").write_text(json.dumps(_scene_record(sid, scene, cfg)) + "\n",
                                                            encoding="utf-8")
            ids.append(sid)
        for d in ("points", "labels", "images"):
            shutil.rmtree(out / d, ignore_errors=True)
            os.replace(staging / d, out / d)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_json(out / "dataset.json", {**expected, "ids": ids, "grid_hint": BEVGrid(
        cfg.x_range, cfg.y_range, 0.5).to_dict(), "frames": "ego: x forward, y left, z up; boxes x,y,z,l,w,h,yaw"})
    return out


# ----------------------------------------------------------------------------------------------- reading


def check_boxes(boxes: Tensor | np.ndarray, where: str) -> None:
    """Refuse boxes that are not [N, 7], not finite, or have a non-positive size, naming `where` and the box."""
    arr = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != BOX_DIM:
        raise DataError(f"{where}: boxes must be [N, {BOX_DIM}] (x, y, z, l, w, h, yaw), got shape {list(arr.shape)}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: box {int(np.nonzero(bad)[0][0])} has a NaN or infinite value: "
                        f"{arr[bad][0].tolist()}")
    small = (arr[:, 3:6] <= 0).any(axis=1)
    if small.any():
        raise DataError(f"{where}: box {int(np.nonzero(small)[0][0])} has a non-positive size (l, w, h) "
                        f"{arr[small][0, 3:6].tolist()}; sizes must be > 0")


def check_camera(k: np.ndarray, cam_to_ego: np.ndarray, image_size: Sequence[int], grid: BEVGrid | None,
                 where: str) -> None:
    """Refuse a calibration that is malformed or projects no part of the BEV grid (on the ground) onto the image."""
    if k.shape != (3, 3) or cam_to_ego.shape != (4, 4) or not (np.isfinite(k).all() and np.isfinite(cam_to_ego).all()):
        raise DataError(f"{where}: intrinsics must be a finite 3x3 and cam_to_ego a finite 4x4 matrix, got "
                        f"{list(k.shape)} and {list(cam_to_ego.shape)}")
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise DataError(f"{where}: focal lengths (fx, fy) = ({k[0, 0]}, {k[1, 1]}) must be positive")
    rot = cam_to_ego[:3, :3]
    if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-4) or np.linalg.det(rot) < 0:
        raise DataError(f"{where}: the rotation of cam_to_ego is not a proper rotation matrix")
    if grid is None:
        return
    centers = grid.cell_centers().reshape(-1, 2).numpy().astype(np.float64)
    pts = np.concatenate([centers, np.zeros((len(centers), 1))], axis=1)
    cam = (pts - cam_to_ego[:3, 3]) @ rot  # ego → camera: Rᵀ (p − t)
    depth = cam[:, 2]
    front = depth > 1e-3
    uv = (cam[front] @ k.T)[:, :2] / depth[front, None]
    h, w = image_size
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
    if not inside.any():
        raise DataError(f"{where}: the camera calibration projects no cell of the BEV grid {grid.to_dict()} onto "
                        f"its {h}x{w} image; check intrinsics, cam_to_ego and the grid range")


def read_dataset_info(root: str | os.PathLike) -> dict:
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} not found: {root} is not a complete synthetic-bev data set; write one with "
                        "`xmodal data synth-bev --out DIR`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        info["ids"] = [str(i) for i in info["ids"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid data set index ({type(e).__name__}: {e})") from e
    return info


class BEVSceneDataset(Dataset):
    """Scenes of a synthetic-bev folder (or any folder with the same layout) as dicts of tensors.

    Item: `id`, `points` [P, 4] (ego frame), `image` [3, H, W] in [0, 1], `intrinsics` [3, 3], `cam_to_ego`
    [4, 4], `boxes` [N, 7] and `labels` [N] (class indices into `classes`). A scene may have no boxes. Points
    outside `grid` are kept here (the LiDAR encoder drops them); boxes whose centre lies outside it are dropped
    (counted per item as `boxes_outside`). Malformed files raise DataError naming the file.
    `collate` pads points and boxes with masks (see `collate_bev`) and adds the grid as batch["bev_grid"].
    """

    def __init__(self, root: str | os.PathLike, grid: BEVGrid | None = None, *, camera: str = CAMERA,
                 classes: Sequence[str] = CLASSES, max_scenes: int | None = None):
        self.root = Path(root)
        self.info = read_dataset_info(self.root)
        self.ids = self.info["ids"][:max_scenes] if max_scenes else self.info["ids"]
        self.grid, self.camera, self.classes = grid, camera, tuple(classes)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        self._checked: set[bytes] = set()
        self.collate = functools.partial(collate_bev, grid=grid)

    def __len__(self) -> int:
        return len(self.ids)

    def sample_key(self, index: int) -> str:
        return self.ids[index]

    def labels_path(self, sid: str) -> Path:
        return self.root / "labels" / f"{sid}.json"

    def read_labels(self, sid: str) -> tuple[Tensor, Tensor, dict]:
        """(boxes [N, 7], labels [N], the calibration dict) of scene `sid`, checked."""
        path = self.labels_path(sid)
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            boxes = np.asarray([[*b["center"], *b["size"], b["yaw"]] for b in rec["boxes"]], dtype=np.float64)
            names = [b["class"] for b in rec["boxes"]]
            calib = rec["calibration"]
        except FileNotFoundError:
            raise DataError(f"{path}: labels of scene '{sid}' not found") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: not a valid synthetic-bev label file ({type(e).__name__}: {e})") from e
        boxes = boxes.reshape(-1, BOX_DIM)
        check_boxes(boxes, str(path))
        unknown = [n for n in names if n not in self._class_index]
        if unknown:
            raise DataError(f"{path}: unknown class '{unknown[0]}'; this data set's classes are "
                            f"{', '.join(self.classes)}")
        labels = np.asarray([self._class_index[n] for n in names], dtype=np.int64)
        return torch.from_numpy(boxes).float(), torch.from_numpy(labels), calib

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        sid = self.ids[index]
        boxes, labels, calib = self.read_labels(sid)
        pts_path = self.root / "points" / f"{sid}.npy"
        try:
            points = np.load(pts_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{pts_path}: cannot read the point cloud ({type(e).__name__}: {e})") from e
        if points.ndim != 2 or points.shape[1] != 4 or not np.isfinite(points).all():
            raise DataError(f"{pts_path}: points must be a finite [P, 4] array (x, y, z, intensity), got "
                            f"{points.dtype} {list(points.shape)}")
        cams = calib.get("cameras", {}) if isinstance(calib, Mapping) else {}
        if self.camera not in cams:
            raise DataError(f"{self.labels_path(sid)}: no camera '{self.camera}' in its calibration (cameras: "
                            f"{', '.join(cams) or 'none'})")
        cam = cams[self.camera]
        k = np.asarray(cam["intrinsics"], dtype=np.float64)
        ext = np.asarray(cam["cam_to_ego"], dtype=np.float64)
        img_path = self.root / "images" / self.camera / f"{sid}.png"
        try:
            with Image.open(img_path) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"{img_path}: cannot read the image ({e})") from e
        key = k.tobytes() + ext.tobytes() + bytes(str(image.shape), "ascii")
        if key not in self._checked:
            check_camera(k, ext, image.shape[:2], self.grid, f"{self.labels_path(sid)} camera '{self.camera}'")
            self._checked.add(key)
        outside = 0
        if self.grid is not None and len(boxes):
            keep = self.grid.contains(boxes[:, :2])
            outside = int((~keep).sum())
            boxes, labels = boxes[keep], labels[keep]
        return {
            "id": sid,
            "points": torch.from_numpy(points.astype(np.float32)),
            "image": torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0,
            "intrinsics": torch.from_numpy(k).float(),
            "cam_to_ego": torch.from_numpy(ext).float(),
            "boxes": boxes,
            "labels": labels,
            "boxes_outside": outside,
        }


def collate_bev(samples: Sequence[Mapping[str, Any]], grid: BEVGrid | None = None) -> dict[str, Any]:
    """Stack BEV items: points padded to the largest cloud (`points_mask`), boxes padded to the most boxes (at
    least one slot; `box_mask` True = real, padded labels −1), images and calibration stacked, `ids` listed."""
    if not samples:
        raise DataError("collate_bev got no samples")
    b = len(samples)
    n_pts = max(int(s["points"].shape[0]) for s in samples)
    n_box = max(1, max(int(s["boxes"].shape[0]) for s in samples))
    points = torch.zeros(b, n_pts, 4)
    points_mask = torch.zeros(b, n_pts, dtype=torch.bool)
    boxes = torch.zeros(b, n_box, BOX_DIM)
    labels = torch.full((b, n_box), -1, dtype=torch.long)
    box_mask = torch.zeros(b, n_box, dtype=torch.bool)
    for i, s in enumerate(samples):
        p, n = s["points"].shape[0], s["boxes"].shape[0]
        points[i, :p], points_mask[i, :p] = s["points"], True
        boxes[i, :n], labels[i, :n], box_mask[i, :n] = s["boxes"], s["labels"], True
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise DataError(f"images of one batch differ in size: {sorted(shapes)}; all cameras must share one size")
    batch: dict[str, Any] = {
        "ids": [str(s["id"]) for s in samples],
        "points": points,
        "points_mask": points_mask,
        "image": torch.stack([s["image"] for s in samples]),
        "intrinsics": torch.stack([s["intrinsics"] for s in samples]),
        "cam_to_ego": torch.stack([s["cam_to_ego"] for s in samples]),
        "boxes": boxes,
        "box_labels": labels,
        "box_mask": box_mask,
    }
    if grid is not None:
        batch["bev_grid"] = grid
    return batch

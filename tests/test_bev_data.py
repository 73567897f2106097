"""synthetic-bev: ray casting, determinism, files on disk, the data set, its collate and its refusals."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data import bev as B
from xmodal.errors import ConfigError, DataError

SMALL = B.BEVWorldConfig(lidar_beams=8, lidar_azimuths=120, image_size=(24, 40), objects=(2, 4))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return B.generate_bev_dataset(tmp_path_factory.mktemp("bev") / "d", 3, seed=7, cfg=SMALL, progress=False)


def test_ray_hits_nearest_box_then_ground():
    boxes = np.array([[10.0, 0, 1, 2, 2, 2, 0.0], [20.0, 0, 1, 2, 2, 2, 0.3]])
    origin = np.array([0.0, 0.0, 1.0])
    dirs = np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, -1.0] / np.sqrt(2), [0, 0, 1.0]])
    t, what, normal = B.cast_rays(origin, dirs, boxes, 100.0)
    assert what.tolist() == [0, -2, -1, -2]  # the near box occludes the far one; sideways: nothing; down: ground
    assert t[0] == pytest.approx(9.0) and normal[0].tolist() == [-1.0, 0.0, 0.0]
    assert t[2] == pytest.approx(math.sqrt(2)) and normal[2].tolist() == [0.0, 0.0, 1.0]


def test_ray_hits_rotated_box_on_its_face():
    yaw = math.pi / 4  # a 4 x 2 box turned 45°: its long side's end points towards the ray at 2 m from the centre
    boxes = np.array([[10.0, 0, 1, 4, 2, 2, yaw]])
    t, what, _ = B.cast_rays(np.array([0.0, 0, 1]), np.array([[1.0, 0, 0]]), boxes, 100.0)
    # the ray along x enters the rotated rectangle where |x'|=2 or |y'|=1 first: x' = (x-10)cos45, y' = -(x-10)sin45
    assert what[0] == 0 and t[0] == pytest.approx(10 - 1 / math.sin(yaw))


def test_generation_is_deterministic_per_seed(tmp_path):
    a = B.generate_bev_dataset(tmp_path / "a", 2, seed=3, cfg=SMALL, progress=False)
    b = B.generate_bev_dataset(tmp_path / "b", 2, seed=3, cfg=SMALL, progress=False)
    c = B.generate_bev_dataset(tmp_path / "c", 2, seed=4, cfg=SMALL, progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    info = json.loads((a / "dataset.json").read_text())
    assert info["name"] == "synthetic-bev" and info["ids"] == ["000000", "000001"]
    assert info["classes"] == list(B.CLASSES)
    assert not [p for p in a.iterdir() if p.name.startswith(".staging")]


def test_existing_folder_reused_or_refused(tmp_path):
    out = B.generate_bev_dataset(tmp_path / "d", 1, seed=0, cfg=SMALL, progress=False)
    before = _digest(out)
    B.generate_bev_dataset(out, 1, seed=0, cfg=SMALL, progress=False)  # complete: nothing to do
    assert _digest(out) == before
    with pytest.raises(DataError, match="different synthetic-bev"):
        B.generate_bev_dataset(out, 1, seed=1, cfg=SMALL, progress=False)
    B.generate_bev_dataset(out, 1, seed=1, cfg=SMALL, progress=False, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["seed"] == 1


def test_scene_content_points_and_camera(scenes):
    ds = B.BEVSceneDataset(scenes)
    item = ds[0]
    boxes, labels, pts = item["boxes"], item["labels"], item["points"]
    assert item["id"] == "000000" and len(boxes) >= 2 and set(labels.tolist()) <= {0, 1, 2}
    for b, c in zip(boxes.tolist(), labels.tolist()):
        spec = B.OBJECT_CLASSES[B.CLASSES[c]]
        assert spec.length[0] <= b[3] <= spec.length[1] and spec.width[0] <= b[4] <= spec.width[1]
        assert b[2] == pytest.approx(b[5] / 2, abs=1e-5)  # standing on the ground
    # every point is on the ground or on a box surface (within the range noise)
    xy = pts[:, :2]
    on_box = torch.zeros(len(pts), dtype=torch.bool)
    for b in boxes:
        c, s = math.cos(b[6]), math.sin(b[6])
        d = xy - b[:2]
        lx, ly = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]
        on_box |= (lx.abs() <= b[3] / 2 + 0.15) & (ly.abs() <= b[4] / 2 + 0.15) & (pts[:, 2] <= b[5] + 0.15)
    assert on_box.any()
    assert (pts[~on_box, 2].abs() < 0.15).all()
    # the camera sees the nearest box at the projection of its centre, in its class colour
    k, ext = item["intrinsics"].double(), item["cam_to_ego"].double()
    j = int(boxes[:, 0].argmin())
    cam = (boxes[j, :3].double() - ext[:3, 3]) @ ext[:3, :3]
    u, v = (cam @ k.T)[:2] / cam[2]
    pixel = item["image"][:, int(v), int(u)] * 255
    color = torch.tensor(B.OBJECT_CLASSES[B.CLASSES[int(labels[j])]].color, dtype=torch.float32)
    assert int(pixel.argmax()) == int(color.argmax())


def test_collate_pads_boxes_and_points_with_masks(scenes):
    grid = B.BEVGrid((0, 32), (-16, 16), 4.0)
    ds = B.BEVSceneDataset(scenes, grid)
    items = [ds[0], ds[1]]
    batch = ds.collate(items)
    n = [len(i["boxes"]) for i in items]
    assert batch["ids"] == ["000000", "000001"]
    assert batch["boxes"].shape == (2, max(n), 7) and batch["box_mask"].sum(1).tolist() == n
    assert (batch["box_labels"][~batch["box_mask"]] == -1).all() and (batch["boxes"][~batch["box_mask"]] == 0).all()
    assert batch["points_mask"].sum(1).tolist() == [len(i["points"]) for i in items]
    assert batch["image"].shape == (2, 3, 24, 40) and batch["bev_grid"] == grid
    empty = dict(items[0], boxes=torch.zeros(0, 7), labels=torch.zeros(0, dtype=torch.long))
    batch = B.collate_bev([empty])
    assert batch["boxes"].shape == (1, 1, 7) and not batch["box_mask"].any()  # a scene without boxes


def test_boxes_outside_grid_dropped(scenes):
    small = B.BEVGrid((0, 16), (-8, 8), 2.0)
    full = B.BEVSceneDataset(scenes)[0]
    item = B.BEVSceneDataset(scenes, small)[0]
    inside = small.contains(full["boxes"][:, :2])
    assert len(item["boxes"]) == int(inside.sum()) and item["boxes_outside"] == int((~inside).sum())


def _copy(scenes: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(scenes, dst)
    return dst


@pytest.mark.parametrize("bad, match", [
    ({"size": [0.0, 1.0, 1.0]}, "box 0 has a non-positive size"),
    ({"center": [float("nan"), 0.0, 0.5]}, "box 0 has a NaN"),
    ({"class": "truck"}, "unknown class 'truck'"),
])
def test_bad_boxes_named(scenes, tmp_path, bad, match):
    root = _copy(scenes, tmp_path / "d")
    path = root / "labels" / "000000.json"
    rec = json.loads(path.read_text())
    rec["boxes"][0].update(bad)
    path.write_text(json.dumps(rec))
    with pytest.raises(DataError, match=match) as e:
        B.BEVSceneDataset(root)[0]
    assert "000000.json" in str(e.value)


def test_camera_that_sees_no_grid_refused(scenes, tmp_path):
    root = _copy(scenes, tmp_path / "d")
    path = root / "labels" / "000000.json"
    rec = json.loads(path.read_text())
    ext = np.array(rec["calibration"]["cameras"]["front"]["cam_to_ego"])
    ext[:3, :3] = ext[:3, :3] @ np.diag([-1.0, 1.0, -1.0])  # turned round: looks backwards
    rec["calibration"]["cameras"]["front"]["cam_to_ego"] = ext.tolist()
    path.write_text(json.dumps(rec))
    B.BEVSceneDataset(root)[0]  # without a grid there is nothing to check against
    with pytest.raises(DataError, match="projects no cell of the BEV grid"):
        B.BEVSceneDataset(root, B.BEVGrid())[0]


def test_bad_points_and_missing_folder(scenes, tmp_path):
    root = _copy(scenes, tmp_path / "d")
    np.save(root / "points" / "000001.npy", np.full((5, 4), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="000001.npy: points must be a finite"):
        B.BEVSceneDataset(root)[1]
    with pytest.raises(DataError, match="xmodal data synth-bev"):
        B.BEVSceneDataset(tmp_path / "nothing")


def test_grid_geometry_and_config_errors():
    g = B.BEVGrid((0, 8), (-2, 2), 0.5)
    assert g.shape == (8, 16)
    xy = torch.tensor([[0.25, -1.75], [7.75, 1.75]])
    assert g.to_grid(xy).tolist() == [[0.5, 0.5], [15.5, 7.5]]
    assert torch.allclose(g.to_normalized(xy), torch.tensor([[-1 + 1 / 16, -1 + 1 / 8], [1 - 1 / 16, 1 - 1 / 8]]))
    assert torch.equal(g.cell_centers()[0, 0], xy[0]) and torch.equal(g.cell_centers()[-1, -1], xy[1])
    with pytest.raises(ConfigError, match="whole number"):
        B.BEVGrid((0, 8), (-2, 2), 0.3)
    with pytest.raises(ConfigError, match="min < max"):
        B.BEVGrid((8, 0))
    with pytest.raises(ConfigError, match="class_probs"):
        replace(SMALL, class_probs=(1.0, 0.0))


def test_synth_bev_command(tmp_path, capsys):
    from xmodal.cli import main

    assert main(["data", "synth-bev", "--out", str(tmp_path / "d"), "--scenes", "1", "--seed", "2",
                 "--image-size", "24", "40", "--no-progress"]) == 0
    assert "synthetic-bev: 1 scenes (seed 2)" in capsys.readouterr().out
    item = B.BEVSceneDataset(tmp_path / "d")[0]
    assert item["image"].shape == (3, 24, 40)

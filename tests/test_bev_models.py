"""BEV encoders, CenterPoint targets/decoding/NMS, the detection loss and the detector on tiny grids."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.data.bev import BEVGrid, BEVWorldConfig, camera_calibration
from xmodal.errors import ConfigError, DataError
from xmodal.losses import LOSSES
from xmodal.nn.bev import (
    BEVDetector,
    BEVDetectorConfig,
    LiftSplatEncoder,
    PillarEncoder,
    centerpoint_targets,
    circle_nms,
    decode_boxes,
    focal_loss,
    load_detector,
    map_to_tokens,
    save_detector,
)

GRID = BEVGrid((0.0, 16.0), (-8.0, 8.0), 1.0)  # 16 x 16


def test_pillars_fill_only_their_cells():
    torch.manual_seed(0)
    enc = PillarEncoder(GRID, channels=8)
    pts = torch.tensor([[[3.2, -7.5, 0.5, 0.3], [3.7, -7.1, 1.0, 0.8], [10.5, 2.5, 0.1, 0.2]]])
    out = enc(pts)
    assert out.shape == (1, 8, 16, 16)
    filled = (out.abs().sum(1)[0] > 0).nonzero().tolist()
    assert sorted(filled) == [[0, 3], [10, 10]]  # rows along y, columns along x
    # padding points and points off the grid change nothing
    extra = torch.tensor([[[3.5, -7.5, 9.0, 9.0], [40.0, 0.0, 0.0, 0.5], [5.0, -20.0, 0.0, 0.5]]])
    mask = torch.tensor([[True, True, True, False, True, True]])
    assert torch.allclose(enc(torch.cat([pts, extra], 1), mask), out)


def test_lift_splat_geometry_projects_back_and_conserves_mass():
    cfg = BEVWorldConfig(image_size=(32, 48))
    k, ext = (torch.tensor(a, dtype=torch.float32)[None] for a in camera_calibration(cfg))
    enc = LiftSplatEncoder(GRID, channels=4, image_channels=16, depth=(2.0, 14.0), depth_bins=7)
    geom = enc.frustum(k, ext, (4, 6), (32, 48))  # [1, 7, 4, 6, 3]
    cam = (geom - ext[0, :3, 3]) @ ext[0, :3, :3]  # back to the camera frame
    uv = (cam @ k[0].T)[..., :2] / cam[..., 2:]
    assert torch.allclose(cam[..., 2], enc.depths[None, :, None, None].expand(1, 7, 4, 6), atol=1e-4)
    assert torch.allclose(uv[0, 0, 0, 0], torch.tensor([4.0, 4.0]), atol=1e-3)  # first feature pixel's centre
    assert torch.allclose(uv[0, 3, 2, 5], torch.tensor([44.0, 20.0]), atol=1e-3)
    # every lifted feature that lands on the grid is in the BEV map: sums agree
    image = torch.rand(1, 3, 32, 48)
    bev = enc(image, k, ext)
    feats = enc.image(image)
    dc = enc.depth_context(feats)
    volume = dc[:, :7].softmax(1)[:, :, None] * dc[:, 7:][:, None]
    inside = GRID.contains(geom[..., :2])
    assert torch.allclose(bev.sum(), (volume.permute(0, 1, 3, 4, 2)[inside]).sum(), rtol=1e-4)


def _boxes():
    boxes = torch.tensor([[[4.3, -2.6, 0.8, 4.2, 1.8, 1.5, 0.7], [11.5, 5.2, 0.9, 0.6, 0.6, 1.8, -2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    return boxes, torch.tensor([[0, 1, -1]]), torch.tensor([[True, True, False]])


def test_targets_peak_at_centres_and_decode_back_to_the_boxes():
    boxes, labels, mask = _boxes()
    t = centerpoint_targets(boxes, labels, mask, GRID, 3)
    heat = t["heatmap"]
    assert heat[0, 0, 5, 4] == 1 and heat[0, 1, 13, 11] == 1 and heat[0, 2].max() == 0
    assert (heat == 1).sum() == 2 and t["valid"].tolist() == [[True, True, False]]
    # a perfect head: high logits at the centre cells, the targets' regression at those cells
    logits = torch.where(heat == 1, 8.0, -8.0)
    reg = torch.zeros(1, 8, 16 * 16)
    for n in range(2):
        reg[0, :, t["index"][0, n]] = t["regression"][0, n]
    dets = decode_boxes(logits, reg.reshape(1, 8, 16, 16), GRID)[0]
    order = dets["labels"].argsort()
    assert dets["labels"][order].tolist() == [0, 1]
    assert torch.allclose(dets["boxes"][order], boxes[0, :2], atol=1e-5)


def test_circle_nms():
    xy = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.3, 0.0], [5.0, 0.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    kept = circle_nms(xy, scores, labels, torch.tensor([1.0, 1.0]))
    assert kept.tolist() == [0, 2, 3]  # box 1 is within 1 m of a better car; box 2 is another class
    assert circle_nms(xy, scores, labels, torch.tensor([0.1, 0.1])).tolist() == [0, 1, 2, 3]


def test_focal_loss_direct():
    target = torch.tensor([[[[1.0, 0.5], [0.0, 0.2]]]])
    logits = torch.tensor([[[[0.3, -1.0], [-2.0, 0.5]]]])
    p = torch.sigmoid(logits)
    pos = -((1 - p[0, 0, 0, 0]) ** 2 * torch.log(p[0, 0, 0, 0]))
    neg = sum(-((1 - target[0, 0, i, j]) ** 4 * p[0, 0, i, j] ** 2 * torch.log(1 - p[0, 0, i, j]))
              for i, j in [(0, 1), (1, 0), (1, 1)])
    assert focal_loss(logits, target).item() == pytest.approx((pos + neg).item(), rel=1e-5)


def _batch(b: int = 2):
    cfg = BEVWorldConfig(image_size=(32, 48))
    k, ext = (torch.tensor(a, dtype=torch.float32) for a in camera_calibration(cfg))
    boxes, labels, mask = _boxes()
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(b, 64, 4, generator=g) * torch.tensor([16.0, 16.0, 2.0, 1.0]) - torch.tensor([0.0, 8.0, 0, 0])
    return {"ids": [str(i) for i in range(b)], "points": pts, "points_mask": torch.ones(b, 64, dtype=torch.bool),
            "image": torch.rand(b, 3, 32, 48, generator=g), "intrinsics": k.expand(b, 3, 3),
            "cam_to_ego": ext.expand(b, 4, 4), "boxes": boxes.expand(b, -1, -1), "box_labels": labels.expand(b, -1),
            "box_mask": mask.expand(b, -1), "bev_grid": GRID}


def _detector(sensor: str, seed: int = 0, **kw) -> BEVDetector:
    torch.manual_seed(seed)
    return BEVDetector(BEVDetectorConfig(sensor=sensor, grid=GRID, channels=8, backbone_channels=8, head_channels=8,
                                         image_channels=16, depth=(2.0, 18.0), depth_bins=8, **kw))


@pytest.mark.parametrize("sensor", ["lidar", "camera"])
def test_detector_outputs_maps_on_one_grid(sensor):
    model = _detector(sensor)
    out = model(_batch())
    assert out["bev"].tokens.shape == (2, 256, 8) and out["bev"].logits.shape == (2, 256, 3)
    assert out["bev_encoder"].tokens.shape == (2, 256, 8) and out["bev_box"].tokens.shape == (2, 256, 8)
    assert out["bev"].projected is None
    model.project_to({"bev": 12, "bev_encoder": 8})
    out = model(_batch())
    assert out["bev"].projected.tokens.shape == (2, 256, 12) and out["bev_encoder"].projected is None
    model.eval()
    dets = model.detect(_batch())
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 7


def test_detector_refuses_wrong_grid_and_missing_inputs():
    model = _detector("camera")
    with pytest.raises(ConfigError, match="share one grid"):
        model(dict(_batch(), bev_grid=BEVGrid((0.0, 16.0), (-8.0, 8.0), 2.0)))
    with pytest.raises(DataError, match="cam_to_ego"):
        model({k: v for k, v in _batch().items() if k != "cam_to_ego"})
    with pytest.raises(DataError, match="batch\\['points'\\]"):
        _detector("lidar")({k: v for k, v in _batch().items() if k != "points"})
    with pytest.raises(ConfigError, match="unknown sensor 'radar'"):
        BEVDetectorConfig(sensor="radar")


def test_detection_loss_trains_a_tiny_lidar_detector():
    model = _detector("lidar")
    loss = LOSSES.build("centerpoint")
    batch = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        out = loss(model(batch), None, batch)
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert math.isfinite(out.loss.item()) and out.loss.item() < 0.5 * first
    assert out.parts["boxes"].item() == 4  # two real boxes in each of the two scenes
    empty = dict(batch, box_mask=torch.zeros_like(batch["box_mask"]))
    assert math.isfinite(loss(model(empty), None, empty).loss.item())


def test_save_and_load_roundtrip(tmp_path):
    model = _detector("camera").eval()
    model.project_to({"bev": 4})
    save_detector(model, tmp_path / "det.pt", meta={"classes": ["car"]})
    loaded, meta = load_detector(tmp_path / "det.pt", return_meta=True)
    assert meta == {"classes": ["car"]} and loaded.config == model.config
    batch = _batch()
    a, b = model(batch), loaded(batch)
    assert torch.equal(a["bev"].tokens, b["bev"].tokens) and torch.equal(a["bev_box"].tokens, b["bev_box"].tokens)
    assert torch.equal(map_to_tokens(torch.arange(6.0).reshape(1, 1, 2, 3))[0, :, 0], torch.arange(6.0))
    from xmodal.errors import CheckpointError

    torch.save({"kind": "other"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a BEV detector file"):
        load_detector(tmp_path / "x.pt")


def test_teacher_and_student_factories(tmp_path):
    from xmodal.models import create_student, create_teacher

    cfg = BEVDetectorConfig(sensor="lidar", grid=GRID, channels=8, backbone_channels=8, head_channels=8)
    student = create_student(cfg, family="bev")
    save_detector(student, tmp_path / "t.pt")
    teacher = create_teacher({"kind": "bev_detector", "path": str(tmp_path / "t.pt")}, family="bev")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="give 'path'"):
        create_teacher({"kind": "bev_detector"}, family="bev")

"""UniDistill losses: keypoints on the grid, feature/relation/response against direct computation, padding, grads."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.data.bev import BEVGrid
from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import build_losses
from xmodal.losses.unidistill import UniDistillFeature, UniDistillRelation, UniDistillResponse
from xmodal.nn.bev import box_keypoints, map_features, sample_keypoints

GRID = BEVGrid((0.0, 8.0), (-4.0, 4.0), 1.0)  # 8 x 8 cells


def test_keypoints_of_a_rotated_box():
    box = torch.tensor([5.0, 1.0, 0.5, 4.0, 2.0, 1.0, math.pi / 2])  # heading along +y
    kp = box_keypoints(box)
    expected = torch.tensor([[4, 3], [4, -1], [6, -1], [6, 3],  # corners: front-left, rear-left, rear-right, ...
                             [5, 3], [4, 1], [5, -1], [6, 1],  # edge midpoints: front, left, rear, right
                             [5, 1]], dtype=torch.float32)  # centre
    assert torch.allclose(kp, expected, atol=1e-6)
    assert torch.allclose(GRID.to_grid(kp)[8], torch.tensor([5.0, 5.0]))  # centre: column 5, row 5 (cell corner)
    # sampled on maps holding each cell centre's x and y, the keypoints read back their own coordinates
    ramps = GRID.cell_centers().permute(2, 0, 1)[None]  # [1, 2, H, W]
    sampled = sample_keypoints(ramps, box[None, None], GRID)  # [1, 2, 1, 9]
    assert torch.allclose(sampled[0, :, 0].T, expected, atol=1e-5)


def _bilinear(m: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Direct bilinear read of map [C, H, W] at metric (x, y), zeros outside (cell centres at (j+½, i+½))."""
    u = (x - GRID.x_range[0]) / GRID.cell - 0.5
    v = (y - GRID.y_range[0]) / GRID.cell - 0.5
    j0, i0 = math.floor(u), math.floor(v)
    out = torch.zeros(m.shape[0])
    for i, wi in ((i0, 1 - (v - i0)), (i0 + 1, v - i0)):
        for j, wj in ((j0, 1 - (u - j0)), (j0 + 1, u - j0)):
            if 0 <= i < m.shape[1] and 0 <= j < m.shape[2]:
                out += wi * wj * m[:, i, j]
    return out


def _keypoint_feats(m: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    return torch.stack([_bilinear(m, float(x), float(y)) for x, y in box_keypoints(box)], dim=1)  # [C, 9]


def _batch():
    boxes = torch.tensor([[[2.0, 0.5, 0.5, 3.0, 1.6, 1.5, 0.4], [6.0, -2.0, 0.5, 0.7, 0.6, 1.7, -1.2]],
                          [[4.5, 2.5, 0.5, 1.8, 0.7, 1.6, 2.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    return {"boxes": boxes, "box_mask": mask, "box_labels": torch.tensor([[0, 1], [2, -1]]), "bev_grid": GRID}


def _outputs(seed: int, channels: int = 5, classes: int = 3, key_map=("bev", "bev_encoder")):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in key_map:
        m = torch.randn(2, channels, 8, 8, generator=g)
        logits = torch.randn(2, classes, 8, 8, generator=g) if k == "bev" else None
        out[k] = map_features(m, logits)
    out["bev_box"] = map_features(torch.randn(2, 8, 8, 8, generator=g))
    return out


def test_feature_and_relation_zero_for_identical_maps():
    batch, out = _batch(), _outputs(0)
    assert UniDistillFeature()(out, out, batch).loss.item() == 0.0
    assert UniDistillRelation()(out, out, batch).loss.item() == pytest.approx(0.0, abs=1e-7)
    assert UniDistillResponse()(out, out, batch).loss.item() == 0.0


def test_feature_and_relation_match_direct_computation():
    batch, s, t = _batch(), _outputs(1), _outputs(2)
    real = [(0, 0), (0, 1), (1, 0)]
    feat, rel = [], []
    for b, n in real:
        box = batch["boxes"][b, n]
        fs = _keypoint_feats(s["bev_encoder"].tokens[b].T.reshape(5, 8, 8), box)
        ft = _keypoint_feats(t["bev_encoder"].tokens[b].T.reshape(5, 8, 8), box)
        feat.append((fs - ft).abs().mean())
        gs = _keypoint_feats(s["bev"].tokens[b].T.reshape(5, 8, 8), box)
        gt = _keypoint_feats(t["bev"].tokens[b].T.reshape(5, 8, 8), box)
        cos_s = torch.tensor([[torch.cosine_similarity(gs[:, i], gs[:, j], dim=0) for j in range(9)] for i in range(9)])
        cos_t = torch.tensor([[torch.cosine_similarity(gt[:, i], gt[:, j], dim=0) for j in range(9)] for i in range(9)])
        rel.append((cos_s - cos_t).abs().mean())
    assert UniDistillFeature()(s, t, batch).loss.item() == pytest.approx(torch.stack(feat).mean().item(), rel=1e-5)
    assert UniDistillRelation()(s, t, batch).loss.item() == pytest.approx(torch.stack(rel).mean().item(), rel=1e-5)


def test_response_mask_follows_the_gaussian_and_loss_matches():
    batch, s, t = _batch(), _outputs(3), _outputs(4)
    loss = UniDistillResponse(sigma_scale=0.5, min_sigma=0.5, temperature=2.0)
    masks = loss.masks(batch["boxes"], GRID)  # [B, N, 64]
    centers = GRID.cell_centers().reshape(-1, 2)
    for b, n in [(0, 0), (0, 1), (1, 0)]:
        box = batch["boxes"][b, n]
        sigma = max(0.5, 0.5 * math.hypot(box[3], box[4]) / 2)
        d2 = ((centers - box[:2]) ** 2).sum(-1)
        assert torch.allclose(masks[b, n], torch.exp(-d2 / (2 * sigma**2)), atol=1e-6)
        assert int(masks[b, n].argmax()) == int(d2.argmin())  # peak at the cell nearest the centre
    heat = (torch.sigmoid(s["bev"].logits).amax(-1) - torch.sigmoid(t["bev"].logits / 2.0).amax(-1)).abs()
    reg = (s["bev_box"].tokens - t["bev_box"].tokens).abs().mean(-1)
    h = [(masks[b, n] * heat[b]).sum() / masks[b, n].sum() for b, n in [(0, 0), (0, 1), (1, 0)]]
    r = [(masks[b, n] * reg[b]).sum() / masks[b, n].sum() for b, n in [(0, 0), (0, 1), (1, 0)]]
    out = loss(s, t, batch)
    assert out.parts["heatmap"].item() == pytest.approx(torch.stack(h).mean().item(), rel=1e-5)
    assert out.parts["regression"].item() == pytest.approx(torch.stack(r).mean().item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.parts["heatmap"].item() + out.parts["regression"].item(), rel=1e-6)


@pytest.mark.parametrize("loss", [UniDistillFeature(), UniDistillRelation(), UniDistillResponse()])
def test_padding_boxes_contribute_nothing(loss):
    batch, s, t = _batch(), _outputs(5), _outputs(6)
    base = loss(s, t, batch).loss
    more = dict(batch)  # an extra padding slot per scene holding garbage, the old padding slot garbage too
    more["boxes"] = torch.cat([batch["boxes"], torch.full((2, 1, 7), float("nan"))], dim=1)
    more["boxes"][1, 1] = torch.tensor([3.0, 3.0, 0.5, 50.0, 50.0, 1.0, 0.0])
    more["box_mask"] = torch.cat([batch["box_mask"], torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    s_leaf = {k: Features(pooled=f.pooled, tokens=f.tokens.clone().requires_grad_(True), logits=None if f.logits is None
                          else f.logits.clone().requires_grad_(True)) for k, f in s.items()}
    padded = loss(s_leaf, t, more).loss
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)
    padded.backward()
    assert all(torch.isfinite(f.tokens.grad).all() for f in s_leaf.values() if f.tokens.grad is not None)


@pytest.mark.parametrize("loss", [UniDistillFeature(), UniDistillRelation(), UniDistillResponse()])
def test_gradients_reach_the_student_only(loss):
    batch = _batch()
    s, t = _outputs(7), _outputs(8)

    def leaf(out):
        return {k: Features(pooled=f.pooled, tokens=f.tokens.clone().requires_grad_(True),
                            logits=None if f.logits is None else f.logits.clone().requires_grad_(True))
                for k, f in out.items()}

    s, t = leaf(s), leaf(t)
    loss(s, t, batch).loss.backward()
    grads = [f.tokens.grad for f in s.values()] + [f.logits.grad for f in s.values() if f.logits is not None]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(f.tokens.grad is None and (f.logits is None or f.logits.grad is None) for f in t.values())


def test_no_boxes_gives_zero_and_a_graph():
    batch = dict(_batch(), box_mask=torch.zeros(2, 2, dtype=torch.bool))
    s, t = _outputs(9), _outputs(10)
    s["bev_encoder"] = Features(pooled=s["bev_encoder"].pooled,
                                tokens=s["bev_encoder"].tokens.clone().requires_grad_(True))
    out = UniDistillFeature()(s, t, batch)
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_mismatched_grids_and_widths_named():
    batch, s = _batch(), _outputs(11)
    small = _outputs(12)
    small["bev_encoder"] = map_features(torch.randn(2, 5, 4, 4))
    with pytest.raises(ConfigError, match="student"):
        UniDistillFeature()(small, s, batch)
    wide = dict(s, bev_encoder=map_features(torch.randn(2, 7, 8, 8)))
    with pytest.raises(ConfigError, match="projection to the teacher width"):
        UniDistillFeature()(wide, s, batch)
    same = dict(small, bev=map_features(torch.randn(2, 5, 4, 4)))
    with pytest.raises(ConfigError, match="8x8 BEV grid"):
        UniDistillRelation()(same, same, batch)


def test_built_from_config_with_unidistill_weights():
    losses = build_losses([{"name": "unidistill_feature", "weight": 100.0},
                           {"name": "unidistill_relation", "weight": 40.0},
                           {"name": "unidistill_response", "weight": 10.0, "params": {"temperature": 2.0}}])
    s, t = _outputs(13), _outputs(14)
    out = losses(s, t, _batch())
    parts = {k: v.item() for k, v in out.parts.items()}
    total = 100 * parts["unidistill_feature"] + 40 * parts["unidistill_relation"] + 10 * parts["unidistill_response"]
    assert out.loss.item() == pytest.approx(total, rel=1e-5)

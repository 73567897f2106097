"""Relation losses against direct computations: RKD distance and angle, similarity-preserving batch similarity
and batch affinity; scale invariance, differing widths and the tokens level."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import LOSSES


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def one(x, **kw):
    return {"image": Features(x, **kw)}


def rkd_distance_reference(s, t):
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = torch.stack([(s[i] - s[j]).norm() for i, j in pairs])
    dt = torch.stack([(t[i] - t[j]).norm() for i, j in pairs])
    return F.smooth_l1_loss(ds / ds.mean(), dt / dt.mean())


def rkd_angle_reference(s, t):
    def angle(x, i, j, k):
        return torch.dot(F.normalize(x[i] - x[j], dim=0), F.normalize(x[k] - x[j], dim=0))

    trips = [p for p in itertools.permutations(range(len(s)), 3)]
    a_s = torch.stack([angle(s, i, j, k) for i, j, k in trips])
    a_t = torch.stack([angle(t, i, j, k) for i, j, k in trips])
    return F.smooth_l1_loss(a_s, a_t)


def sp_reference(s, t):
    gs = F.normalize(s @ s.T, dim=1)
    gt = F.normalize(t @ t.T, dim=1)
    return ((gs - gt) ** 2).sum() / len(s) ** 2


def affinity_reference(s, t, scale, teacher_scale):
    n = len(s)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        zs = scale * F.cosine_similarity(s[i][None], s[others])
        zt = teacher_scale * F.cosine_similarity(t[i][None], t[others])
        p, q = zt.softmax(0), zs.softmax(0)
        total = total + (p * (p.log() - q.log())).sum()
    return total / n


REFERENCES = {
    "rkd_distance": rkd_distance_reference,
    "rkd_angle": rkd_angle_reference,
    "batch_similarity": sp_reference,
    "batch_affinity": lambda s, t: affinity_reference(s, t, 10.0, 10.0),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_relation_matches_formula_across_widths(name):
    s, t = rand(6, 4, seed=1).requires_grad_(), rand(6, 9, seed=2)
    out = LOSSES.build(name)(one(s), one(t))
    assert out.loss.item() == pytest.approx(REFERENCES[name](s.detach(), t).item(), rel=1e-4)
    out.loss.backward()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_relation_is_invariant_to_a_global_scale(name):
    s, t = rand(5, 4, seed=3), rand(5, 6, seed=4)
    base = LOSSES.build(name)(one(s), one(t)).loss.item()
    assert LOSSES.build(name)(one(250.0 * s), one(0.003 * t)).loss.item() == pytest.approx(base, rel=1e-4)


def test_batch_affinity_with_its_own_teacher_scale():
    s, t = rand(5, 4, seed=5), rand(5, 4, seed=6)
    out = LOSSES.build("batch_affinity", scale=5.0, teacher_scale=20.0)(one(s), one(t))
    assert out.loss.item() == pytest.approx(affinity_reference(s, t, 5.0, 20.0).item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_tokens_level_relates_each_samples_real_tokens(name):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = LOSSES.build(name, level="tokens")(
        {"image": Features(torch.zeros(2, 3), tokens=s, mask=mask)},
        {"image": Features(torch.zeros(2, 4), tokens=t, mask=mask)})
    ref = REFERENCES[name]
    expected = 0.5 * (ref(s[0, :4], t[0, :4]) + ref(s[1], t[1]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_relation_sums_modalities_and_refuses_mismatched_samples():
    s = {"image": Features(rand(4, 3, seed=8)), "text": Features(rand(4, 3, seed=9))}
    t = {"image": Features(rand(4, 5, seed=10)), "text": Features(rand(4, 5, seed=11))}
    out = LOSSES.build("rkd_distance", modalities=["image", "text"])(s, t)
    assert out.loss.item() == pytest.approx((out.parts["image"] + out.parts["text"]).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="must hold the same samples"):
        LOSSES.build("rkd_distance")(one(rand(4, 3)), one(rand(5, 3)))
    with pytest.raises(ConfigError, match="level must be one of"):
        LOSSES.build("rkd_angle", level="pixels")
    with pytest.raises(ConfigError, match="needs student tokens"):
        LOSSES.build("batch_similarity", level="tokens")(one(rand(4, 3)), one(rand(4, 3)))

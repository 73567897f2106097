"""Vision-language distillation losses against design.md: affinity mimicking, CLIP contrastive, CLIP-KD FD and ICL."""

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import LOSSES, build_losses

n = lambda x: F.normalize(x, dim=-1)


def outs(v, t):
    return {"image": Features(pooled=v), "text": Features(pooled=t)}


def soft_ce(z, p):
    return -(p * z.log_softmax(-1)).sum(-1).mean()


def pair(b=6, d=8, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    v, t = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    if grad:
        v.requires_grad_()
        t.requires_grad_()
    return v, t


# ---------------------------------------------------------------- affinity mimicking


def test_affinity_value_matches_formula_with_separate_teacher_scale():
    sv, st = pair(seed=0)
    tv, tt = pair(d=12, seed=1, grad=False)  # teacher width differs; the affinity matrices do not
    loss = LOSSES.build("affinity", scale=30.0, teacher_scale=80.0)
    out = loss(outs(sv, st), outs(tv, tt))
    a_s = 30.0 * n(sv) @ n(st).T
    a_t = 80.0 * n(tv) @ n(tt).T
    expected = 0.5 * (soft_ce(a_s, a_t.softmax(-1)) + soft_ce(a_s.T, a_t.T.softmax(-1)))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.parts["a2b"].item() == pytest.approx(soft_ce(a_s, a_t.softmax(-1)).item(), rel=1e-6)


def test_affinity_at_student_equals_teacher_is_the_teacher_entropy_with_zero_gradient():
    v, t = pair(seed=2, grad=False)
    sv, st = v.clone().requires_grad_(), t.clone().requires_grad_()
    out = LOSSES.build("affinity", scale=50.0)(outs(sv, st), outs(v, t))
    p = (50.0 * n(v) @ n(t).T).softmax(-1)
    q = (50.0 * n(t) @ n(v).T).softmax(-1)
    entropy = 0.5 * (-(p * p.log()).sum(-1).mean() - (q * q.log()).sum(-1).mean())
    assert out.loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    out.loss.backward()
    assert sv.grad.abs().max().item() < 1e-5 and st.grad.abs().max().item() < 1e-5
    # a perturbed student is strictly worse (a seeded perturbation: with the global RNG the draw depended on the
    # tests run before, and a small one can leave the saturated softmax unchanged to float precision)
    noise = torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
    out2 = LOSSES.build("affinity", scale=50.0)(outs(v + 0.5 * noise, t), outs(v, t))
    assert out2.loss.item() > out.loss.item() + 1e-3


def test_affinity_gradients_reach_the_student_only():
    sv, st = pair(seed=3)
    tv, tt = pair(seed=4)  # teacher tensors that would accept gradients
    out = LOSSES.build("affinity")(outs(sv, st), outs(tv, tt))
    out.loss.backward()
    assert sv.grad is not None and sv.grad.abs().sum() > 0 and st.grad.abs().sum() > 0
    assert tv.grad is None and tt.grad is None


def test_affinity_fixed_vs_learned_temperature():
    fixed = LOSSES.build("affinity", scale=50.0, learn_scale=False)
    assert list(fixed.parameters()) == [] and fixed.scale().item() == pytest.approx(50.0)
    learned = LOSSES.build("affinity", scale=50.0, learn_scale=True)
    params = list(learned.parameters())
    assert len(params) == 1 and params[0].item() == pytest.approx(math.log(50.0))
    sv, st = pair(seed=5)
    tv, tt = pair(seed=6, grad=False)
    learned(outs(sv, st), outs(tv, tt)).loss.backward()
    assert params[0].grad is not None and params[0].grad.abs().item() > 0
    # teacher scale defaults to the student's initial scale and never learns
    assert learned.teacher_scale.item() == pytest.approx(50.0) and not learned.teacher_scale.requires_grad


# ---------------------------------------------------------------- CLIP contrastive


def test_clip_loss_matches_symmetric_cross_entropy():
    v, t = pair(seed=7)
    loss = LOSSES.build("clip", scale=1 / 0.07)
    out = loss(outs(v, t))
    logits = (1 / 0.07) * n(v) @ n(t).T
    y = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    scale = loss.scale.log_scale
    assert scale.requires_grad and scale.grad is not None and v.grad is not None
    assert list(LOSSES.build("clip", learn_scale=False).parameters()) == []


def test_clip_loss_low_for_aligned_pairs():
    v = torch.eye(6, 8)
    aligned = LOSSES.build("clip")(outs(v, v.clone())).loss.item()
    shuffled = LOSSES.build("clip")(outs(v, v.roll(1, dims=0))).loss.item()
    assert aligned < 0.01 < shuffled


# ---------------------------------------------------------------- CLIP-KD feature distillation


def test_fd_matches_formula_and_is_zero_at_teacher():
    sv, st = pair(seed=8)
    tv, tt = pair(seed=9, grad=False)
    out = LOSSES.build("fd")(outs(sv, st), outs(tv, tt))
    expected = F.mse_loss(n(sv), n(tv)) + F.mse_loss(n(st), n(tt))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out.parts) == {"image", "text"}
    assert out.parts["image"].item() == pytest.approx(F.mse_loss(n(sv), n(tv)).item(), rel=1e-6)
    at_teacher = LOSSES.build("fd")(outs(3 * tv, 2 * tt), outs(tv, tt))  # scale does not matter after norm
    assert at_teacher.loss.item() == pytest.approx(0.0, abs=1e-7)


def test_fd_gradients_student_only_and_modalities():
    sv, st = pair(seed=10)
    tv, tt = pair(seed=11)
    out = LOSSES.build("fd", modalities=["image"])(outs(sv, st), outs(tv, tt))
    out.loss.backward()
    assert sv.grad is not None and st.grad is None  # text not part of this loss
    assert tv.grad is None and tt.grad is None
    with pytest.raises(ValueError, match="alignment space"):
        LOSSES.build("fd")(outs(*pair(d=8)), outs(*pair(d=12, grad=False)))


# ---------------------------------------------------------------- CLIP-KD interactive contrastive


def test_icl_matches_formula():
    sv, st = pair(seed=12)
    tv, tt = pair(seed=13, grad=False)
    loss = LOSSES.build("icl", scale=20.0)
    out = loss(outs(sv, st), outs(tv, tt))
    y = torch.arange(6)
    expected = 0.5 * (
        F.cross_entropy(20.0 * n(sv) @ n(tt).T, y) + F.cross_entropy(20.0 * n(st) @ n(tv).T, y)
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.parts["scale"].item() == pytest.approx(20.0, rel=1e-6)


def test_icl_learnable_temperature_and_student_only_gradients():
    loss = LOSSES.build("icl")
    assert loss.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    (param,) = list(loss.parameters())
    sv, st = pair(seed=14)
    tv, tt = pair(seed=15)
    loss(outs(sv, st), outs(tv, tt)).loss.backward()
    assert param.grad is not None and sv.grad is not None and st.grad is not None
    assert tv.grad is None and tt.grad is None
    assert list(LOSSES.build("icl", learn_scale=False).parameters()) == []


def test_icl_low_when_student_matches_teacher_pairs():
    e = torch.eye(6, 8)
    good = LOSSES.build("icl")(outs(e, e.clone()), outs(e, e.clone())).loss.item()
    bad = LOSSES.build("icl")(outs(e, e.clone()), outs(e.roll(1, 0), e.roll(1, 0))).loss.item()
    assert good < 0.01 < bad


# ---------------------------------------------------------------- composed from YAML-like specs


def test_clip_kd_recipe_combines_with_weights():
    sv, st = pair(seed=16)
    tv, tt = pair(seed=17, grad=False)
    specs = [{"name": "clip", "weight": 1.0}, {"name": "fd", "weight": 2000.0},
             {"name": "icl", "weight": 1.0}, {"name": "affinity", "weight": 0.5, "params": {"learn_scale": True}}]
    loss_set = build_losses(specs)
    out = loss_set(outs(sv, st), outs(tv, tt))
    parts = {k: v for k, v in out.parts.items() if "/" not in k}
    expected = parts["clip"] + 2000.0 * parts["fd"] + parts["icl"] + 0.5 * parts["affinity"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"fd/image", "fd/text", "icl/a2b", "icl/b2a"} <= set(out.parts)
    with pytest.raises(ConfigError, match="unknown parameter 'temperature'"):
        build_losses([{"name": "icl", "params": {"temperature": 0.1}}])
    with pytest.raises(ConfigError, match="needs teacher outputs"):
        LOSSES.build("icl")(outs(sv, st), None)

"""Core losses against direct computations of the formulas in design.md."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.config import LossSpec
from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import LOSSES, build_losses


def feats(pooled, **kw):
    return Features(pooled=pooled, **kw)


def ce_soft(z, p):
    return -(p * z.log_softmax(-1)).sum(-1).mean()


# ---------------------------------------------------------------- affinity mimicking / CLIP


def test_affinity_matches_formula_and_widths_may_differ():
    torch.manual_seed(0)
    sv, st = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    tv, tt = torch.randn(5, 12), torch.randn(5, 12)
    loss = LOSSES.build("affinity", scale=50.0)
    out = loss({"image": feats(sv), "text": feats(st)}, {"image": feats(tv), "text": feats(tt)})
    n = F.normalize
    a_s, a_t = 50 * n(sv, dim=-1) @ n(st, dim=-1).T, 50 * n(tv, dim=-1) @ n(tt, dim=-1).T
    expected = 0.5 * (ce_soft(a_s, a_t.softmax(-1)) + ce_soft(a_s.T, a_t.T.softmax(-1)))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert sv.grad is not None and st.grad is not None


def test_affinity_minimal_when_student_equals_teacher():
    torch.manual_seed(1)
    v, t = torch.randn(6, 8), torch.randn(6, 8)
    loss = LOSSES.build("affinity")
    s_v, s_t = v.clone().requires_grad_(), t.clone().requires_grad_()
    out = loss({"image": feats(s_v), "text": feats(s_t)}, {"image": feats(v), "text": feats(t)})
    out.loss.backward()
    # soft CE equals the teacher's own entropy at its minimum; the gradient vanishes there
    a = 50 * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
    ent = 0.5 * (ce_soft(a, a.softmax(-1)) + ce_soft(a.T, a.T.softmax(-1)))
    assert out.loss.item() == pytest.approx(ent.item(), rel=1e-5)
    assert s_v.grad.abs().max() < 1e-5 and s_t.grad.abs().max() < 1e-5


def test_clip_loss_matches_cross_entropy_and_learns_scale():
    torch.manual_seed(2)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    loss = LOSSES.build("clip", scale=10.0, learn_scale=True)
    out = loss({"image": feats(a), "text": feats(b)})
    logits = 10 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    y = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert loss.scale.log_scale.grad is not None
    fixed = LOSSES.build("clip", learn_scale=False)
    assert not any(p.requires_grad for p in fixed.parameters())


# ---------------------------------------------------------------- logit KD family


def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("name", ["hinton", "reverse_kl", "js"])
def test_logit_losses_match_formula(name):
    torch.manual_seed(3)
    zs, zt, T = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), 3.0
    out = LOSSES.build(name, modality="image", temperature=T)(
        {"image": feats(torch.zeros(4, 2), logits=zs)}, {"image": feats(torch.zeros(4, 2), logits=zt)}
    )
    ps, pt = (zs / T).softmax(-1), (zt / T).softmax(-1)
    m = 0.5 * (ps + pt)
    per = {"hinton": kl(pt, ps), "reverse_kl": kl(ps, pt), "js": 0.5 * (kl(pt, m) + kl(ps, m))}[name]
    assert out.loss.item() == pytest.approx((T * T * per).mean().item(), rel=1e-5)
    out.loss.backward()
    assert zs.grad is not None
    same = LOSSES.build(name, modality="image")(
        {"image": feats(torch.zeros(4, 2), logits=zt)}, {"image": feats(torch.zeros(4, 2), logits=zt)}
    )
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_logits_mask_really_masks_and_sample_weights():
    torch.manual_seed(4)
    zs, zt = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = LOSSES.build("hinton", modality="video", temperature=1.0)

    def run(s, t, batch=None):
        fs = feats(torch.zeros(2, 3), tokens=torch.zeros(2, 5, 3), mask=mask, logits=s)
        return loss({"video": fs}, {"video": feats(torch.zeros(2, 3), logits=t)}, batch).loss

    base = run(zs, zt)
    zs2 = zs.clone()
    zs2[0, 3:] = 100.0  # change only padded steps
    assert run(zs2, zt).item() == pytest.approx(base.item(), rel=1e-6)
    per = kl(zt.softmax(-1), zs.softmax(-1))
    expected = torch.stack([per[0, :3].mean(), per[1].mean()])
    assert base.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    w = {"sample_weight": torch.tensor([0.0, 1.0])}
    assert run(zs, zt, w).item() == pytest.approx(expected[1].item(), rel=1e-5)


# ---------------------------------------------------------------- feature losses


def test_feature_mse_and_cosine():
    torch.manual_seed(5)
    s, t = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    out = LOSSES.build("feature_mse", modalities=["image"])({"image": feats(s)}, {"image": feats(t)})
    assert out.loss.item() == pytest.approx(F.mse_loss(s, t).item(), rel=1e-6)
    out.loss.backward()
    assert s.grad is not None and t.grad is None  # gradients reach the student only
    fd = LOSSES.build("feature_mse", modalities=["image"], normalize=True)({"image": feats(s)}, {"image": feats(t)})
    n = F.normalize
    assert fd.loss.item() == pytest.approx(F.mse_loss(n(s, dim=-1), n(t, dim=-1)).item(), rel=1e-5)
    cos = LOSSES.build("feature_cosine", modalities=["image"])({"image": feats(s)}, {"image": feats(t)})
    assert cos.loss.item() == pytest.approx((1 - F.cosine_similarity(s, t)).mean().item(), rel=1e-5)
    zero = LOSSES.build("feature_mse", modalities=["image"])({"image": feats(t)}, {"image": feats(t)})
    assert zero.loss.item() == 0.0


def test_token_level_feature_loss_masks_padding():
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss = LOSSES.build("feature_mse", modalities=["video"], level="tokens")

    def run(x):
        return loss({"video": feats(torch.zeros(2, 3), tokens=x, mask=mask)},
                    {"video": feats(torch.zeros(2, 3), tokens=t, mask=mask)}).loss

    s2 = s.clone()
    s2[0, 2:] += 50
    assert run(s).item() == pytest.approx(run(s2).item())
    per = (s - t).pow(2).mean(-1)
    expected = 0.5 * (per[0, :2].mean() + per[1].mean())
    assert run(s).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- registry and loss set


def test_loss_set_weights_parts_and_errors():
    torch.manual_seed(6)
    s = {"image": feats(torch.randn(4, 8)), "text": feats(torch.randn(4, 8))}
    t = {"image": feats(torch.randn(4, 8)), "text": feats(torch.randn(4, 8))}
    ls = build_losses([{"name": "affinity", "weight": 0.5}, LossSpec("clip", 2.0, {"learn_scale": False})])
    out = ls(s, t)
    a = LOSSES.build("affinity")(s, t).loss
    c = LOSSES.build("clip", learn_scale=False)(s).loss
    assert out.loss.item() == pytest.approx((0.5 * a + 2.0 * c).item(), rel=1e-5)
    assert {"affinity", "affinity/a2b", "clip", "clip/b2a"} <= set(out.parts)
    with pytest.raises(ConfigError, match="unknown loss 'afinity'.*did you mean 'affinity'"):
        build_losses([{"name": "afinity"}])
    with pytest.raises(ConfigError, match="loss 'affinity': unknown parameter 'scal'.*did you mean 'scale'"):
        build_losses([{"name": "affinity", "params": {"scal": 3}}])
    with pytest.raises(ConfigError, match="used twice"):
        build_losses([{"name": "clip"}, {"name": "clip"}])
    with pytest.raises(ConfigError, match="needs teacher features for modality 'text'.*produced: image"):
        LOSSES.build("affinity")(s, {"image": t["image"]})


def test_fixed_scale_is_log_parametrised():
    loss = LOSSES.build("affinity", scale=50.0)
    assert loss.scale().item() == pytest.approx(50.0)
    assert loss.scale.log_scale.item() == pytest.approx(math.log(50.0))


# ---------------------------------------------------------------- native and projected views


def test_loss_set_hands_each_loss_its_view_and_checks_declared_inputs():
    torch.manual_seed(3)
    native = {m: torch.randn(4, 8, requires_grad=True) for m in ("image", "text")}
    proj = nn.Linear(8, 12)
    s = {m: feats(v, projected=feats(proj(v))) for m, v in native.items()}
    t = {m: feats(torch.randn(4, 12)) for m in ("image", "text")}
    ls = build_losses([{"name": "affinity"}, {"name": "fd"}])
    seen = {}
    for loss in ls.losses:
        loss.register_forward_hook(lambda m, args, out: seen.__setitem__(m.name, args[0]))
    ls(s, t).loss.backward()
    assert seen["affinity"]["image"].pooled is native["image"] and seen["affinity"]["image"].projected is None
    assert seen["fd"]["image"].pooled is s["image"].projected.pooled
    assert proj.weight.grad is not None  # fd trains the projection; affinity compared native features
    # calling a loss directly hands it the same view as the set does
    assert LOSSES.build("fd")(s, t).loss.item() == pytest.approx(LOSSES.build("fd")(
        {m: f.projected for m, f in s.items()}, t).loss.item())

    produces = {"image": ["pooled"], "text": ["pooled"]}
    ls.check_inputs(produces, produces)
    with pytest.raises(ConfigError, match=r"'js' \(label 'soft'\) needs student image\.logits, teacher image\.logits"):
        build_losses([{"name": "js", "label": "soft"}]).check_inputs(produces, produces)
    with pytest.raises(ConfigError, match=r"'feature_mse' needs student text\.tokens, teacher text\.tokens"):
        build_losses([{"name": "feature_mse", "params": {"modalities": ["text"], "level": "tokens"}}]).check_inputs(
            produces, produces)
    build_losses([{"name": "js", "weight": 0.0}, {"name": "clip"}]).check_inputs(produces, None)  # weight 0: unused

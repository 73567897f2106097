"""Logit losses against direct computations of their formulas: top-k KL, DKD, DIST, TAID (and its schedule state
through checkpoints), SinKD; and KL with classes a model rules out (−inf logits)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xmodal.config import TrainConfig
from xmodal.errors import ConfigError, DataError
from xmodal.features import Features
from xmodal.losses import LOSSES, build_losses


def outs(z: torch.Tensor) -> dict[str, Features]:
    return {"image": Features(torch.zeros(z.shape[0], 2), logits=z)}


def kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def logits(seed=0, b=6, c=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g)).requires_grad_(), scale * torch.randn(b, c, generator=g)


# ---------------------------------------------------------------- KL with ruled-out classes


@pytest.mark.parametrize("name", ["hinton", "reverse_kl", "js", "dkd", "taid", "topk_kl"])
def test_classes_with_minus_infinity_logits_stay_finite(name):
    """Both models rule out class 0 (e.g. a masked vocabulary entry): 0·log(0/0) counts as 0, not NaN."""
    zs, zt = logits(seed=1)
    zs = zs.detach().clone()
    zs[:, 0] = -math.inf
    zs.requires_grad_()
    zt = zt.clone()
    zt[:, 0] = -math.inf
    params = {"total_steps": 5} if name == "taid" else {}
    out = LOSSES.build(name, **params)(outs(zs), outs(zt), {"label": torch.full((6,), 2)})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(zs.grad).all()
    if name == "hinton":
        p_t, p_s = (zt[:, 1:] / 4).softmax(-1), (zs[:, 1:].detach() / 4).softmax(-1)
        assert out.loss.item() == pytest.approx((16 * kl(p_t, p_s)).mean().item(), rel=1e-5)


# ---------------------------------------------------------------- top-k KL


def test_topk_kl_lumped_tail_matches_formula_and_is_zero_at_equality():
    zs, zt = logits(seed=2, c=6)
    k, T = 2, 2.0
    out = LOSSES.build("topk_kl", k=k, temperature=T, tail="lump")(outs(zs), outs(zt))
    p_t, p_s = (zt / T).softmax(-1), (zs / T).softmax(-1)
    top = p_t.topk(k, dim=-1).indices
    pt_k, ps_k = p_t.gather(1, top), p_s.gather(1, top)
    pt_full = torch.cat([pt_k, 1 - pt_k.sum(1, keepdim=True)], 1)
    ps_full = torch.cat([ps_k, 1 - ps_k.sum(1, keepdim=True)], 1)
    assert out.loss.item() == pytest.approx((T * T * kl(pt_full, ps_full)).mean().item(), rel=1e-5)
    same = LOSSES.build("topk_kl", k=k)(outs(zt.clone().requires_grad_()), outs(zt))
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_topk_kl_uniform_tail_matches_formula_and_its_minimum_is_the_flattened_teacher():
    zs, zt = logits(seed=3, c=6)
    k = 2
    out = LOSSES.build("topk_kl", k=k, temperature=1.0, tail="uniform")(outs(zs), outs(zt))
    p_t, p_s = zt.softmax(-1), zs.softmax(-1)
    top = p_t.topk(k, dim=-1).indices
    target = torch.zeros_like(p_t)
    keep = torch.zeros_like(p_t, dtype=torch.bool).scatter_(1, top, True)
    tail = (1 - p_t.gather(1, top).sum(1, keepdim=True)) / (6 - k)
    target = torch.where(keep, p_t, tail.expand_as(p_t))
    assert out.loss.item() == pytest.approx(kl(target, p_s).mean().item(), rel=1e-5)
    at_target = LOSSES.build("topk_kl", k=k, tail="uniform")(outs(target.log().requires_grad_()), outs(zt))
    assert at_target.loss.item() == pytest.approx(0.0, abs=1e-6)
    # k at least the class count is the plain KL
    full = LOSSES.build("topk_kl", k=10, temperature=1.0)(outs(zs), outs(zt))
    assert full.loss.item() == pytest.approx(kl(p_t, p_s).mean().item(), rel=1e-5)
    with pytest.raises(ConfigError, match="tail must be one of"):
        LOSSES.build("topk_kl", tail="drop")


# ---------------------------------------------------------------- DKD


def dkd_reference(zs, zt, y, alpha, beta, T):
    """Zhao et al.'s construction: binary target/non-target KL, and KL over the non-target classes."""
    gt = torch.nn.functional.one_hot(y, zs.shape[1]).bool()
    p_s, p_t = (zs / T).softmax(-1), (zt / T).softmax(-1)
    b_s = torch.stack([p_s[gt], p_s[~gt].view(len(y), -1).sum(1)], 1)
    b_t = torch.stack([p_t[gt], p_t[~gt].view(len(y), -1).sum(1)], 1)
    tckd = kl(b_t, b_s) * T * T
    n_s = (zs[~gt].view(len(y), -1) / T).softmax(-1)
    n_t = (zt[~gt].view(len(y), -1) / T).softmax(-1)
    nckd = kl(n_t, n_s) * T * T
    return (alpha * tckd + beta * nckd).mean(), tckd.mean(), nckd.mean()


def test_dkd_matches_formula_with_labels_and_with_the_teacher_top_class():
    zs, zt = logits(seed=4)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = LOSSES.build("dkd", alpha=1.0, beta=8.0, temperature=4.0)
    out = loss(outs(zs), outs(zt), {"label": y})
    total, tckd, nckd = dkd_reference(zs.detach(), zt, y, 1.0, 8.0, 4.0)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert out.parts["tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert out.parts["nckd"].item() == pytest.approx(nckd.item(), rel=1e-5)
    free = LOSSES.build("dkd", label_key=None, temperature=2.0)(outs(zs), outs(zt))
    assert free.loss.item() == pytest.approx(
        dkd_reference(zs.detach(), zt, zt.argmax(1), 1.0, 8.0, 2.0)[0].item(), rel=1e-5)


def test_dkd_refuses_a_batch_without_labels_or_with_bad_ones():
    zs, zt = logits(seed=5)
    with pytest.raises(DataError, match=r"batch\['label'\].*keys: image_ids"):
        LOSSES.build("dkd")(outs(zs), outs(zt), {"image_ids": [1]})
    with pytest.raises(DataError, match="class ids from 0 to 9"):
        LOSSES.build("dkd")(outs(zs), outs(zt), {"label": torch.tensor([0, 1, 2, 3, 4, 9])})


# ---------------------------------------------------------------- DIST


def test_dist_matches_pearson_formula():
    zs, zt = logits(seed=6)
    T, beta, gamma = 2.0, 1.5, 0.5
    out = LOSSES.build("dist", temperature=T, beta=beta, gamma=gamma)(outs(zs), outs(zt))
    p_s, p_t = (zs.detach() / T).softmax(-1), (zt / T).softmax(-1)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(p_s, p_t)]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(p_s.T, p_t.T)]).mean()
    assert out.loss.item() == pytest.approx((T * T * (beta * inter + gamma * intra)).item(), rel=1e-4)
    assert out.parts["inter"].item() == pytest.approx((T * T * inter).item(), rel=1e-4)
    # invariant to a shift of the student's logits (softmax is), unlike a feature distance
    shifted = LOSSES.build("dist", temperature=T, beta=beta, gamma=gamma)(outs(zs + 3.0), outs(zt))
    assert shifted.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)


# ---------------------------------------------------------------- TAID


def taid_reference(losses, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The schedule of Shing et al.'s reference implementation, call by call."""
    t, m, prev, ts = t_start, 0.0, None, []
    for step, loss in enumerate(losses):
        ts.append(t)
        if prev is None:
            prev = loss
            continue
        rel = (prev - loss) / (prev + 1e-15)
        m = beta * m + (1 - beta) * rel
        linear = t_start + (t_end - t_start) * min(step / total, 1.0)
        t = min(t_end, max(linear, t + alpha / (1 + math.exp(-m)) * (1 - t)))
        prev = loss
    return ts, t


def test_taid_value_is_kl_to_the_interpolated_target():
    zs, zt = logits(seed=7)
    loss = LOSSES.build("taid", total_steps=10, temperature=2.0)
    out = loss(outs(zs), outs(zt))
    t = 0.4
    target = ((1 - t) * zs.detach() + t * zt) / 2.0
    expected = (4.0 * kl(target.softmax(-1), (zs.detach() / 2.0).softmax(-1))).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.parts["t"].item() == pytest.approx(0.4)
    # the target is built from a detached student: the gradient is the KL's with p_t held fixed
    out.loss.backward()
    zs2 = zs.detach().clone().requires_grad_()
    (4.0 * kl(target.softmax(-1).detach(), (zs2 / 2.0).softmax(-1))).mean().backward()
    assert torch.allclose(zs.grad, zs2.grad, atol=1e-6)


def test_taid_schedule_follows_the_reference_and_only_moves_in_training():
    torch.manual_seed(0)
    loss = LOSSES.build("taid", total_steps=6, alpha=0.2, beta=0.5)
    seen, ts = [], []
    for i in range(9):
        zs, zt = logits(seed=20 + i)
        out = loss(outs(zs), outs(zt))
        seen.append(out.loss.item())
        ts.append(out.parts["t"].item())
    expected_ts, final = taid_reference(seen, total=6, alpha=0.2, beta=0.5)
    assert ts == pytest.approx(expected_ts, abs=1e-6)
    assert loss.t.item() == pytest.approx(final, abs=1e-6)
    assert loss.t.item() == pytest.approx(1.0)  # past total_steps the linear floor reaches t_end
    # evaluation and no-grad calls leave the schedule alone
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.eval()
    loss(outs(zs), outs(zt))
    loss.train()
    with torch.no_grad():
        loss(outs(zs), outs(zt))
    assert all(torch.equal(state[k], v) for k, v in loss.state_dict().items())


def test_taid_linear_schedule_without_adaptation():
    loss = LOSSES.build("taid", total_steps=4, adaptive=False, t_start=0.2, t_end=0.8)
    ts = []
    for i in range(6):
        zs, zt = logits(seed=40 + i)
        ts.append(loss(outs(zs), outs(zt)).parts["t"].item())
    assert ts == pytest.approx([0.2, 0.2, 0.35, 0.5, 0.65, 0.8], abs=1e-6)


def test_taid_schedule_state_survives_a_checkpoint_round_trip(tmp_path):
    loss = LOSSES.build("taid", total_steps=50, alpha=0.3)
    for i in range(5):
        zs, zt = logits(seed=60 + i)
        loss(outs(zs), outs(zt))
    state = build_losses([{"name": "taid", "params": {"total_steps": 50, "alpha": 0.3}}]).state_dict()
    assert {"losses.0.t", "losses.0.momentum", "losses.0.prev_loss", "losses.0.steps"} <= set(state)
    path = tmp_path / "losses.pt"
    torch.save(loss.state_dict(), path)
    fresh = LOSSES.build("taid", total_steps=50, alpha=0.3)
    assert fresh.t.item() == pytest.approx(0.4)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for k, v in loss.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # both continue identically
    zs, zt = logits(seed=70)
    a, b = loss(outs(zs), outs(zt)), fresh(outs(zs), outs(zt))
    assert a.loss.item() == b.loss.item() and torch.equal(loss.t, fresh.t)


def test_taid_refuses_a_missing_or_bad_schedule():
    with pytest.raises(ConfigError, match="total_steps must be a positive integer"):
        LOSSES.build("taid")
    with pytest.raises(ConfigError, match="t_start"):
        LOSSES.build("taid", total_steps=5, t_start=0.9, t_end=0.5)


class Classifier(nn.Module):
    """A linear classifier returning image Features with logits."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(6, 4)

    def forward(self, batch):
        z = self.fc(batch["image"])
        return {"image": Features(z, logits=z)}


class Points(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(24, 6, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"id": f"p{i}", "image": self.x[i]}


def test_taid_schedule_resumes_through_the_distiller(tmp_path):
    """An interrupted run resumed from its checkpoint ends with the same t as an uninterrupted one."""
    from xmodal.engine import Distiller

    spec = [{"name": "taid", "params": {"total_steps": 40, "alpha": 0.3}}]
    cfg = TrainConfig(steps=8, batch_size=6, lr=0.05, warmup_steps=0, log_every=1, seed=0, device="cpu",
                      ckpt_every=4, precision="fp32")

    def make(run_dir, resume=None):
        losses = build_losses(spec)
        return Distiller(Classifier(1), losses, Points(), cfg, run_dir, teacher=Classifier(2), resume=resume,
                         config={"losses": spec}, teacher_fingerprint="t", progress=False), losses

    straight, straight_losses = make(tmp_path / "a")
    straight.fit()
    first, first_losses = make(tmp_path / "b")
    first.fit(until=4)
    t_half = first_losses.losses[0].t.item()
    resumed, resumed_losses = make(tmp_path / "b", resume="latest")
    assert resumed_losses.losses[0].t.item() == pytest.approx(0.4)  # a fresh loss, before the resume loads
    resumed.fit()
    final = resumed_losses.losses[0]
    assert final.steps.item() == 8 and final.t.item() > t_half > 0.4
    for k, v in straight_losses.state_dict().items():
        assert torch.equal(resumed_losses.state_dict()[k], v), k


# ---------------------------------------------------------------- SinKD


def sinkhorn_reference(p_s, p_t, eps, iters):
    """Plain (not log-domain) Sinkhorn with uniform marginals; the transport cost Σ P·C."""
    cost = (p_s[:, None] - p_t[None]).abs().sum(-1)
    k = torch.exp(-cost / eps).double()
    n = len(p_s)
    u = torch.ones(n, dtype=torch.float64)
    v = torch.ones(n, dtype=torch.float64)
    for _ in range(iters):
        u = (1.0 / n) / (k @ v)
        v = (1.0 / n) / (k.T @ u)
    plan = u[:, None] * k * v[None]
    return (plan * cost.double()).sum()


def test_sinkd_matches_sinkhorn_transport_cost():
    zs, zt = logits(seed=8)
    out = LOSSES.build("sinkd", epsilon=0.2, iterations=30, temperature=2.0)(outs(zs), outs(zt))
    expected = sinkhorn_reference((zs.detach() / 2).softmax(-1), (zt / 2).softmax(-1), 0.2, 30)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_sinkd_is_smallest_near_the_teacher_and_vanishes_as_epsilon_shrinks():
    _, zt = logits(seed=9, scale=3.0)
    same = LOSSES.build("sinkd", epsilon=0.05)(outs(zt.clone()), outs(zt)).loss.item()
    for seed in range(3):
        noise = 0.5 * torch.randn(zt.shape, generator=torch.Generator().manual_seed(seed))
        assert LOSSES.build("sinkd", epsilon=0.05)(outs(zt + noise), outs(zt)).loss.item() > same
    sharp = LOSSES.build("sinkd", epsilon=0.005, iterations=200)(outs(zt.clone()), outs(zt)).loss.item()
    assert sharp < same and sharp < 1e-3

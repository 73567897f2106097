"""Ranking losses against direct computations: Margin-MSE on (query, positive, negative) triples (explicit, in-batch
hardest and precomputed teacher scores) and the listwise KL over the teacher's top-k candidates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError, DataError
from xmodal.features import Features
from xmodal.losses import LOSSES


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def triple(q, d, n=None):
    out = {"text": Features(q), "image": Features(d)}
    if n is not None:
        out["negative"] = Features(n)
    return out


def test_margin_mse_with_explicit_negatives_matches_formula():
    sq, sd, sn = rand(5, 4, seed=1).requires_grad_(), rand(5, 4, seed=2), rand(5, 4, seed=3)
    tq, td, tn = rand(5, 6, seed=4), rand(5, 6, seed=5), rand(5, 6, seed=6)
    out = LOSSES.build("margin_mse", negative="negative", scale=2.0, teacher_scale=0.5)(
        triple(sq, sd, sn), triple(tq, td, tn))
    s_margin = 2.0 * ((sq * sd).sum(1) - (sq * sn).sum(1))
    t_margin = 0.5 * ((tq * td).sum(1) - (tq * tn).sum(1))
    assert out.loss.item() == pytest.approx(((s_margin - t_margin) ** 2).mean().item(), rel=1e-5)
    out.loss.backward()
    assert sq.grad.abs().sum() > 0


def test_margin_mse_picks_the_teachers_hardest_in_batch_negative():
    sq, sd = rand(5, 4, seed=7), rand(5, 4, seed=8)
    tq, td = rand(5, 6, seed=9), rand(5, 6, seed=10)
    out = LOSSES.build("margin_mse", normalize=True)(triple(sq, sd), triple(tq, td))
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    t_all = n(tq) @ n(td).T
    t_all.fill_diagonal_(-float("inf"))
    hard = t_all.argmax(1)
    s_margin = (n(sq) * n(sd)).sum(1) - (n(sq) * n(sd)[hard]).sum(1)
    t_margin = (n(tq) * n(td)).sum(1) - t_all.max(1).values
    assert out.loss.item() == pytest.approx(((s_margin - t_margin) ** 2).mean().item(), rel=1e-5)


def test_margin_mse_with_precomputed_teacher_scores():
    sq, sd, sn = rand(3, 4, seed=11), rand(3, 4, seed=12), rand(3, 4, seed=13)
    scores = torch.tensor([[3.0, 1.0], [2.0, 2.5], [0.0, -1.0]])
    loss = LOSSES.build("margin_mse", negative="negative", teacher_scores="ce_scores")
    assert {n.role for n in loss.needs()} == {"student"}
    out = loss(triple(sq, sd, sn), None, {"ce_scores": scores})
    s_margin = (sq * sd).sum(1) - (sq * sn).sum(1)
    assert out.loss.item() == pytest.approx(((s_margin - (scores[:, 0] - scores[:, 1])) ** 2).mean().item(),
                                            rel=1e-5)
    with pytest.raises(DataError, match=r"batch\['ce_scores'\]"):
        loss(triple(sq, sd, sn), None, {"other": 1})
    with pytest.raises(ConfigError, match="set negative"):
        LOSSES.build("margin_mse", teacher_scores="ce_scores")


def listwise_reference(sq, sd, tq, td, k, T, scale, tscale):
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    s, t = scale * n(sq) @ n(sd).T, tscale * n(tq) @ n(td).T
    cols = t.topk(k, dim=1).indices
    s, t = s.gather(1, cols), t.gather(1, cols)
    p, q = (t / T).softmax(1), (s / T).softmax(1)
    return (T * T * (p * (p.log() - q.log())).sum(1)).mean()


def test_listwise_kl_over_the_teachers_top_k():
    sq, sd = rand(6, 4, seed=14).requires_grad_(), rand(6, 4, seed=15)
    tq, td = rand(6, 5, seed=16), rand(6, 5, seed=17)
    out = LOSSES.build("listwise_kl", top_k=3, temperature=2.0, scale=10.0, teacher_scale=30.0)(
        triple(sq, sd), triple(tq, td))
    expected = listwise_reference(sq.detach(), sd, tq, td, 3, 2.0, 10.0, 30.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert sq.grad.abs().sum() > 0
    full = LOSSES.build("listwise_kl")(triple(sq, sd), triple(tq, td))
    assert full.loss.item() == pytest.approx(
        listwise_reference(sq.detach(), sd, tq, td, 6, 1.0, 20.0, 20.0).item(), rel=1e-5)


def test_listwise_kl_adds_negative_modality_candidates():
    sq, sd, sn = rand(3, 4, seed=18), rand(3, 4, seed=19), rand(3, 4, seed=20)
    tq, td, tn = rand(3, 4, seed=21), rand(3, 4, seed=22), rand(3, 4, seed=23)
    out = LOSSES.build("listwise_kl", negative="negative")(triple(sq, sd, sn), triple(tq, td, tn))
    expected = listwise_reference(sq, torch.cat([sd, sn]), tq, torch.cat([td, tn]), 6, 1.0, 20.0, 20.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(DataError, match="at least 2 candidates"):
        LOSSES.build("listwise_kl")(triple(sq[:1], sd[:1]), triple(tq[:1], td[:1]))

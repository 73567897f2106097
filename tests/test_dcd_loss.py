"""DCD retrieval distillation: formula by direct computation, hard-negative choice, entropy weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import LOSSES, build_losses
from xmodal.losses.dcd import DCDLoss


def outputs(image, text):
    return {"image": Features(image), "text": Features(text)}


def pair(b=6, ds=8, dt=12, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    s = outputs(torch.randn(b, ds, generator=g), torch.randn(b, ds, generator=g))
    t = outputs(torch.randn(b, dt, generator=g), torch.randn(b, dt, generator=g))
    if grad:
        for f in (*s.values(), *t.values()):
            f.pooled.requires_grad_(True)
    return s, t


def direct_loss(s, t, k, temp, scale, query="text", doc="image", weights=True, sample_weight=None):
    """Loops over queries: candidates = positive + the k negatives with the highest teacher score."""
    sq, sd = (F.normalize(s[m].pooled.float(), dim=-1) for m in (query, doc))
    tq, td = (F.normalize(t[m].pooled.float(), dim=-1) for m in (query, doc))
    losses, ws = [], []
    for i in range(len(sq)):
        t_all = [scale * float(tq[i] @ td[j]) for j in range(len(td))]
        negs = sorted((j for j in range(len(td)) if j != i), key=lambda j: -t_all[j])[:k]
        cand = [i, *negs]
        zt = torch.tensor([t_all[j] for j in cand]) / temp
        zs = torch.stack([scale * (sq[i] @ sd[j]) for j in cand]) / temp
        p = torch.softmax(zt, 0)
        kl = (p * (torch.log(p) - torch.log_softmax(zs, 0))).sum() * temp**2
        h = -(p * torch.log(p)).sum()
        w = (1 - h / math.log(k + 1)) if weights else torch.tensor(1.0)
        if sample_weight is not None:
            w = w * sample_weight[i]
        losses.append(kl)
        ws.append(w)
    losses, ws = torch.stack(losses), torch.stack(ws)
    return (ws * losses).sum() / ws.sum()


@pytest.mark.parametrize("temp, k", [(1.0, 2), (2.0, 4), (0.5, 10)])
def test_matches_direct_computation(temp, k):
    s, t = pair()
    loss = DCDLoss(num_negatives=k, temperature=temp, scale=5.0)(s, t).loss
    expected = direct_loss(s, t, min(k, 5), temp, 5.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_other_direction_and_unweighted():
    s, t = pair(seed=1)
    loss = DCDLoss(query="image", doc="text", num_negatives=3, scale=4.0, weighting="none")(s, t).loss
    expected = direct_loss(s, t, 3, 1.0, 4.0, query="image", doc="text", weights=False)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_zero_when_student_equals_teacher():
    _, t = pair()
    loss = DCDLoss(num_negatives=3)(t, t).loss
    assert loss.abs().item() < 1e-6


def test_gradients_reach_the_student_only():
    s, t = pair(grad=True)
    DCDLoss(num_negatives=3)(s, t).loss.backward()
    assert s["image"].pooled.grad.abs().sum() > 0 and s["text"].pooled.grad.abs().sum() > 0
    assert t["image"].pooled.grad is None and t["text"].pooled.grad is None


def test_hard_negatives_are_the_highest_teacher_scores():
    loss = DCDLoss(num_negatives=2)
    t_scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0], [0.0, 9.0, 8.0, 2.0, 7.0], [6.0, 6.5, 1.0, 0.0, 2.0]])
    cols = loss.select(t_scores, torch.tensor([0, 1, 2]))
    assert cols[:, 0].tolist() == [0, 1, 2]  # positive first
    assert [set(r) for r in cols[:, 1:].tolist()] == [{2, 4}, {2, 4}, {0, 1}]


def test_high_entropy_queries_weigh_less():
    # query 0: the teacher separates its candidates clearly; query 1: the teacher sees them all alike
    td = torch.eye(4)
    tq = torch.stack([torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])])
    td = td[:2]
    t = {"image": Features(td), "text": Features(tq)}
    extra = torch.eye(4)[2:]
    s, _ = pair(b=2, ds=4, seed=3)
    loss = DCDLoss(num_negatives=3, scale=10.0)
    kl, w = loss.per_query(s, t, {"negatives": {"student": torch.randn(2, 4), "teacher": extra}})
    assert w[0] > 0.5 > w[1] >= 0 and w[1] < 1e-6


def test_sample_weight_masks_queries():
    s, t = pair(seed=4)
    sw = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    loss = DCDLoss(num_negatives=3, scale=5.0)(s, t, {"sample_weight": sw}).loss
    expected = direct_loss(s, t, 3, 1.0, 5.0, sample_weight=sw)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("per_query", [False, True])
def test_extra_negatives_join_the_candidates(per_query):
    s, t = pair(b=3, seed=5)
    g = torch.Generator().manual_seed(6)
    shape_s, shape_t = ((3, 4, 8), (3, 4, 12)) if per_query else ((4, 8), (4, 12))
    neg = {"student": torch.randn(*shape_s, generator=g), "teacher": torch.randn(*shape_t, generator=g)}
    loss = DCDLoss(num_negatives=3, scale=5.0)
    s_scores, t_scores, pos = loss.candidate_scores(s, t, {"negatives": neg})
    assert s_scores.shape == t_scores.shape == (3, 7)
    tq = F.normalize(t["text"].pooled, dim=-1)
    tn = F.normalize(neg["teacher"], dim=-1)
    expected = tq @ tn.T if not per_query else torch.einsum("bd,bmd->bm", tq, tn)
    torch.testing.assert_close(t_scores[:, 3:], 5.0 * expected)
    out = loss(s, t, {"negatives": neg})
    assert torch.isfinite(out.loss) and set(out.parts) == {"kl", "weight"}


def test_built_from_registry_and_config():
    assert "dcd" in LOSSES
    s, t = pair(seed=7)
    total = build_losses([{"name": "dcd", "weight": 0.5, "params": {"num_negatives": 2, "scale": 5.0}}])(s, t)
    assert total.loss.item() == pytest.approx(0.5 * direct_loss(s, t, 2, 1.0, 5.0).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="num_negatives"):
        LOSSES.build("dcd", num_negatives=0)
    with pytest.raises(ConfigError, match="did you mean 'num_negatives'"):
        LOSSES.build("dcd", num_negative=3)


def test_single_pair_without_negatives_is_zero():
    s, t = pair(b=1, grad=True)
    out = DCDLoss()(s, t)
    assert out.loss.item() == 0.0
    out.loss.backward()

"""Feature losses against direct computations: linear CKA (and its invariances), ND with teacher class means
(from a teacher pass, a file or a checkpoint), OFA's projected head, and the scale invariance of feature_cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError, DataError
from xmodal.features import Features
from xmodal.losses import LOSSES
from xmodal.losses.feature_kd import load_class_means, save_class_means, teacher_class_means


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def one(x, **kw):
    return {"image": Features(x, **kw)}


# ---------------------------------------------------------------- CKA


def cka_reference(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def test_cka_matches_formula_across_widths():
    s, t = rand(8, 5, seed=1).requires_grad_(), rand(8, 11, seed=2)
    out = LOSSES.build("cka")(one(s), one(t))
    assert out.loss.item() == pytest.approx(1 - cka_reference(s.detach(), t).item(), rel=1e-5)
    out.loss.backward()
    assert s.grad.abs().sum() > 0


def test_cka_is_invariant_to_scale_and_rotation_and_zero_for_linear_copies():
    s, t = rand(10, 6, seed=3), rand(10, 6, seed=4)
    base = LOSSES.build("cka")(one(s), one(t)).loss.item()
    q, _ = torch.linalg.qr(rand(6, 6, seed=5))
    assert LOSSES.build("cka")(one(37.0 * s), one(0.01 * t)).loss.item() == pytest.approx(base, rel=1e-4)
    assert LOSSES.build("cka")(one(s @ q + 3.0), one(t)).loss.item() == pytest.approx(base, rel=1e-4)
    # a scaled, rotated, shifted copy of the teacher is a perfect match
    assert LOSSES.build("cka")(one(2.5 * t @ q - 1.0), one(t)).loss.item() == pytest.approx(0.0, abs=1e-5)


def test_cka_on_tokens_is_per_sample_and_weighted():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = LOSSES.build("cka", level="tokens")

    def run(batch=None):
        return loss({"image": Features(torch.zeros(2, 4), tokens=s, mask=mask)},
                    {"image": Features(torch.zeros(2, 3), tokens=t, mask=mask)}, batch).loss.item()

    per = [1 - cka_reference(s[0, :4], t[0, :4]), 1 - cka_reference(s[1], t[1])]
    assert run() == pytest.approx(float(sum(per) / 2), rel=1e-5)
    assert run({"sample_weight": torch.tensor([0.0, 1.0])}) == pytest.approx(float(per[1]), rel=1e-5)


def test_feature_cosine_is_scale_invariant_and_mse_is_not():
    s, t = rand(4, 6, seed=7), rand(4, 6, seed=8)
    cos = LOSSES.build("feature_cosine", modalities=["image"])
    mse = LOSSES.build("feature_mse", modalities=["image"])
    assert cos(one(5.0 * s), one(0.2 * t)).loss.item() == pytest.approx(cos(one(s), one(t)).loss.item(), rel=1e-5)
    assert mse(one(5.0 * s), one(t)).loss.item() != pytest.approx(mse(one(s), one(t)).loss.item(), rel=1e-2)


# ---------------------------------------------------------------- ND


def nd_reference(s, t, means, y):
    c = F.normalize(means[y], dim=-1)
    return (1 - (s * c).sum(-1) / torch.maximum(s.norm(dim=-1), t.norm(dim=-1))).mean()


def test_nd_matches_formula_and_is_zero_along_the_class_mean_with_enough_norm():
    means = rand(3, 5, seed=9)
    s, t = rand(6, 5, seed=10).requires_grad_(), rand(6, 5, seed=11)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = LOSSES.build("nd")
    loss.set_class_means(means)
    out = loss(one(s), one(t), {"label": y})
    assert out.loss.item() == pytest.approx(nd_reference(s.detach(), t, means, y).item(), rel=1e-5)
    out.loss.backward()
    assert s.grad.abs().sum() > 0
    along = F.normalize(means[y], dim=-1) * (t.norm(dim=-1, keepdim=True) * 1.5)
    assert loss(one(along), one(t), {"label": y}).loss.item() == pytest.approx(0.0, abs=1e-6)
    short = F.normalize(means[y], dim=-1) * (t.norm(dim=-1, keepdim=True) * 0.5)
    assert loss(one(short), one(t), {"label": y}).loss.item() == pytest.approx(0.5, abs=1e-5)


def test_nd_reads_the_projected_view():
    means = rand(2, 6, seed=12)
    native, proj, t = rand(4, 3, seed=13), rand(4, 6, seed=14), rand(4, 6, seed=15)
    loss = LOSSES.build("nd")
    loss.set_class_means(means)
    y = torch.tensor([0, 1, 1, 0])
    out = loss({"image": Features(native, projected=Features(proj))}, one(t), {"label": y})
    assert out.loss.item() == pytest.approx(nd_reference(proj, t, means, y).item(), rel=1e-5)


class MeanTeacher(torch.nn.Module):
    def forward(self, batch):
        return {"image": Features(batch["x"] * 2.0)}


def test_nd_class_means_from_a_teacher_pass_a_file_and_a_checkpoint(tmp_path):
    x = rand(9, 4, seed=16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    batches = [{"x": x[:5], "label": y[:5]}, {"x": x[5:], "label": y[5:]}]
    means = teacher_class_means(MeanTeacher(), batches)
    expected = torch.stack([(2 * x[y == c]).mean(0) for c in range(3)])
    assert torch.allclose(means, expected, atol=1e-6)
    path = save_class_means(tmp_path / "means.pt", means)
    np.save(tmp_path / "means.npy", means.numpy())
    assert torch.equal(load_class_means(tmp_path / "means.npy"), means)
    loss = LOSSES.build("nd", class_means=str(path))
    assert torch.equal(loss.class_means, means)
    # the means travel in the state dict into a loss built without them
    fresh = LOSSES.build("nd")
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.class_means, means)
    with pytest.raises(DataError, match=r"class\(es\) \[3\]"):
        teacher_class_means(MeanTeacher(), batches, num_classes=4)


def test_nd_errors_name_what_is_missing(tmp_path):
    s, t = rand(2, 3, seed=17), rand(2, 3, seed=18)
    with pytest.raises(ConfigError, match="no teacher class means"):
        LOSSES.build("nd")(one(s), one(t), {"label": torch.tensor([0, 1])})
    with pytest.raises(ConfigError, match="does not exist"):
        LOSSES.build("nd", class_means=str(tmp_path / "nope.pt"))
    torch.save({"class_means": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match=r"bad\.pt must hold a float tensor \[classes, dim\], got \[3\]"):
        LOSSES.build("nd", class_means=str(tmp_path / "bad.pt"))
    loss = LOSSES.build("nd")
    loss.set_class_means(torch.ones(2, 3))
    with pytest.raises(DataError, match="class ids from 0 to 5, but there are 2 classes"):
        loss(one(s), one(t), {"label": torch.tensor([0, 5])})
    by_teacher = LOSSES.build("nd", label_key=None)
    by_teacher.set_class_means(torch.ones(2, 3))
    with pytest.raises(DataError, match="below the 2 class means"):
        by_teacher(one(s), {"image": Features(t, logits=torch.tensor([[0.0, 0, 0, 0, 9], [9.0, 0, 0, 0, 0]]))})


# ---------------------------------------------------------------- OFA


def ofa_reference(zs, zt, y, gamma, T):
    p_s, p_t = (zs / T).softmax(-1), (zt / T).softmax(-1)
    onehot = F.one_hot(y, zs.shape[1]).float()
    return (-(((p_t + onehot) ** gamma - onehot) * p_s.log()).sum(-1)).mean()


def test_ofa_head_projects_the_student_into_the_teacher_logit_space():
    torch.manual_seed(0)
    loss = LOSSES.build("ofa", dim=6, num_classes=4, gamma=1.5, temperature=2.0)
    native, proj = rand(5, 3, seed=19), rand(5, 6, seed=20).requires_grad_()
    zt = rand(5, 4, seed=21)
    y = torch.tensor([0, 1, 2, 3, 0])
    out = loss({"image": Features(native, projected=Features(proj))}, one(torch.zeros(5, 2), logits=zt), {"label": y})
    zs = loss.head(proj.detach())
    assert out.loss.item() == pytest.approx(ofa_reference(zs, zt, y, 1.5, 2.0).item(), rel=1e-5)
    out.loss.backward()
    assert proj.grad.abs().sum() > 0 and loss.head.weight.grad.abs().sum() > 0
    # gamma = 1 is soft cross-entropy to the teacher, minimal where the head reproduces the teacher's logits
    ce = LOSSES.build("ofa", dim=6, num_classes=4, gamma=1.0)
    val = ce(one(proj.detach()), one(torch.zeros(5, 2), logits=zt), {"label": y}).loss
    zs = ce.head(proj.detach())
    assert val.item() == pytest.approx((-(zt.softmax(-1) * zs.log_softmax(-1)).sum(-1)).mean().item(), rel=1e-5)


def test_ofa_refuses_mismatched_widths_and_missing_sizes():
    with pytest.raises(ConfigError, match="dim must be a positive integer"):
        LOSSES.build("ofa")
    loss = LOSSES.build("ofa", dim=6, num_classes=4)
    with pytest.raises(ConfigError, match="set dim and num_classes"):
        loss(one(rand(2, 5)), one(torch.zeros(2, 2), logits=rand(2, 4)), {"label": torch.tensor([0, 1])})


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_nd_class_means_file_with_pickled_code_is_refused_by_name(tmp_path):
    from xmodal.errors import CheckpointError

    path = tmp_path / "means.pt"
    torch.save({"class_means": _Payload()}, path)
    with pytest.raises(CheckpointError, match="means.pt") as info:
        load_class_means(path)
    assert "class means file" in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_class_means(garbage)

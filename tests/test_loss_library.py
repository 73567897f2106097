"""Properties every loss of the distillation library keeps: gradients reach the student only, values and gradients
stay finite with logits of 1e4 and with fp16/bf16 inputs, the minimum sits where student equals teacher (zero
where the formula promises it), batch-level values ignore the order of the samples, and padding is ignored."""

from __future__ import annotations

import pytest
import torch

from xmodal.features import Features
from xmodal.losses import LOSSES

B, C, DS, DT, T = 6, 5, 4, 7, 5

# name → constructor parameters, on outputs built by `outputs` below
LIBRARY = {
    "hinton": {},
    "reverse_kl": {},
    "js": {},
    "topk_kl": {"k": 2},
    "dkd": {},
    "dist": {},
    "taid": {"total_steps": 10},
    "sinkd": {},
    "feature_mse": {"modalities": ["image"]},
    "feature_cosine": {"modalities": ["image"]},
    "cka": {},
    "nd": {},
    "ofa": {"dim": DT, "num_classes": C},
    "rkd_distance": {},
    "rkd_angle": {},
    "batch_similarity": {},
    "batch_affinity": {},
    "margin_mse": {},
    "listwise_kl": {},
}
ZERO_AT_EQUALITY = sorted(set(LIBRARY) - {"sinkd", "nd", "ofa"})  # ND/OFA have other minima; SinKD is entropic
BATCH_LEVEL = ["dist", "sinkd", "cka", "rkd_distance", "rkd_angle", "batch_similarity", "batch_affinity",
               "margin_mse", "listwise_kl"]
PER_STEP_LOGITS = ["hinton", "reverse_kl", "js", "topk_kl", "dkd", "dist", "taid", "sinkd"]
TOKEN_LEVEL = ["cka", "rkd_distance", "rkd_angle", "batch_similarity", "batch_affinity", "feature_mse"]


def build(name: str, **extra):
    loss = LOSSES.build(name, **{**LIBRARY[name], **extra})
    if name == "nd":
        loss.set_class_means(torch.randn(C, DT, generator=torch.Generator().manual_seed(9)))
    return loss


def tensors(seed: int = 0, same: bool = False) -> dict[str, torch.Tensor]:
    """Leaf tensors for both models; with `same`, the student's equal the teacher's (equal widths)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    t = {f"t_{m}_{k}": r(B, DT) for m in ("image", "text") for k in ("pooled",)}
    t["t_image_logits"] = r(B, C)
    t["t_text_logits"] = r(B, C)
    s = {"s_image_native": r(B, DS), "s_image_proj": r(B, DT), "s_text_native": r(B, DS),
         "s_text_proj": r(B, DT), "s_image_logits": r(B, C), "s_text_logits": r(B, C)}
    if same:
        for m in ("image", "text"):
            s[f"s_{m}_native"] = t[f"t_{m}_pooled"].clone()
            s[f"s_{m}_proj"] = t[f"t_{m}_pooled"].clone()
            s[f"s_{m}_logits"] = t[f"t_{m}_logits"].clone()
    return {**s, **t}


def outputs(x: dict[str, torch.Tensor]):
    student = {m: Features(x[f"s_{m}_native"], logits=x[f"s_{m}_logits"],
                           projected=Features(x[f"s_{m}_proj"])) for m in ("image", "text")}
    teacher = {m: Features(x[f"t_{m}_pooled"], logits=x[f"t_{m}_logits"]) for m in ("image", "text")}
    return student, teacher


def run(name, x, batch=None, loss=None):
    loss = loss or build(name)
    student, teacher = outputs(x)
    labels = torch.arange(B) % C
    return loss(student, teacher, {"label": labels} if batch is None else batch)


def leaves(seed=0, same=False, dtype=torch.float32, logit_scale=1.0, feature_scale=1.0):
    x = tensors(seed, same)
    out = {}
    for k, v in x.items():
        v = v * (logit_scale if k.endswith("logits") else feature_scale)
        out[k] = v.to(dtype).requires_grad_()
    return out


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_gradient_reaches_the_student_only(name):
    x = leaves(seed=1)
    out = run(name, x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    student_grads = [v.grad for k, v in x.items() if k.startswith("s_") and v.grad is not None]
    assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    assert all(v.grad is None for k, v in x.items() if k.startswith("t_")), "a teacher tensor got a gradient"


@pytest.mark.parametrize("name", sorted(LIBRARY))
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.float16, 1.0), (torch.bfloat16, 1.0),
                                         (torch.float16, 1e4), (torch.bfloat16, 1e4)])
def test_finite_with_large_logits_and_low_precision(name, dtype, scale):
    x = leaves(seed=2, dtype=dtype, logit_scale=scale)
    out = run(name, x)
    assert torch.isfinite(out.loss), f"{name}: {out.loss}"
    out.loss.backward()
    for k, v in x.items():
        if v.grad is not None:
            assert torch.isfinite(v.grad).all(), f"{name}: non-finite gradient for {k}"


@pytest.mark.parametrize("name", ["cka", "rkd_distance", "rkd_angle", "batch_similarity", "batch_affinity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_relations_of_logits_of_1e4_stay_finite(name, dtype):
    x = leaves(seed=2, dtype=dtype, logit_scale=1e4)
    loss = LOSSES.build(name, level="logits")
    out = run(name, x, loss=loss)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(x["s_image_logits"].grad).all() and x["s_image_logits"].grad.abs().sum() > 0


@pytest.mark.parametrize("name", ZERO_AT_EQUALITY)
def test_zero_with_zero_gradient_when_student_equals_teacher(name):
    x = leaves(seed=3, same=True)
    out = run(name, x)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-5)
    out.loss.backward()
    for k, v in x.items():
        if v.grad is not None:
            assert v.grad.abs().max().item() < 1e-4, f"{name}: gradient {k} at the minimum"
    worse = run(name, leaves(seed=4))
    assert worse.loss.item() > 1e-4


@pytest.mark.parametrize("name", BATCH_LEVEL + ["hinton", "dkd", "nd", "ofa"])
def test_value_does_not_depend_on_sample_order(name):
    x = {k: v.detach() for k, v in leaves(seed=5).items()}
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.manual_seed(0)
    loss = build(name)
    a = run(name, x, {"label": labels}, loss=loss).loss
    b = run(name, {k: v[perm] for k, v in x.items()}, {"label": labels[perm]}, loss=loss).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(set(BATCH_LEVEL) - {"margin_mse", "listwise_kl"}))
def test_batch_level_losses_leave_out_filtered_samples(name):
    """A sample with sample_weight 0 changes nothing, however its features change (ranking losses weight each
    query's term instead: a filtered query's document stays a candidate for the others)."""
    x = {k: v.detach() for k, v in leaves(seed=6).items()}
    labels = torch.arange(B) % C
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    a = run(name, x, {"label": labels, "sample_weight": w}).loss
    y = {k: v.clone() for k, v in x.items()}
    for k in y:
        if k.startswith("s_"):
            y[k][2] = 30.0 * torch.randn_like(y[k][2])
    b = run(name, y, {"label": labels, "sample_weight": w}).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-5)


def seq_outputs(zs, zt, mask):
    fs = Features(torch.zeros(2, 3), tokens=torch.zeros(2, T, 3), mask=mask, logits=zs)
    ft = Features(torch.zeros(2, 3), tokens=torch.zeros(2, T, 3), mask=mask, logits=zt)
    return {"image": fs}, {"image": ft}


@pytest.mark.parametrize("name", PER_STEP_LOGITS)
def test_per_step_logits_mask_really_masks(name):
    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(2, T, C, generator=g), torch.randn(2, T, C, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    labels = torch.randint(0, C, (2, T), generator=g)
    loss = build(name)
    base = loss(*seq_outputs(zs, zt, mask), {"label": labels}).loss
    zs2, zt2, labels2 = zs.clone(), zt.clone(), labels.clone()
    zs2[0, 3:] = 50.0 * torch.randn(2, C)
    zt2[0, 3:] = -50.0 * torch.randn(2, C)
    labels2[0, 3:] = (labels[0, 3:] + 1) % C
    changed = build(name)(*seq_outputs(zs2, zt2, mask), {"label": labels2}).loss
    assert changed.item() == pytest.approx(base.item(), rel=1e-5)
    # and the padded steps would have mattered: without the mask the value moves
    unmasked = build(name)(*seq_outputs(zs2, zt2, torch.ones_like(mask)), {"label": labels2}).loss
    assert abs(unmasked.item() - base.item()) > 1e-3


@pytest.mark.parametrize("name", TOKEN_LEVEL)
def test_token_level_mask_really_masks(name):
    g = torch.Generator().manual_seed(8)
    ts, tt = torch.randn(3, T, DT, generator=g), torch.randn(3, T, DT, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    params = {"modalities": ["image"], "level": "tokens"}

    def value(s, t, m):
        fs = Features(torch.zeros(3, DT), tokens=s, mask=m)
        ft = Features(torch.zeros(3, DT), tokens=t, mask=m)
        return LOSSES.build(name, **params)({"image": fs}, {"image": ft}).loss

    base = value(ts, tt, mask)
    ts2, tt2 = ts.clone(), tt.clone()
    ts2[~mask] = 40.0 * torch.randn(int((~mask).sum()), DT)
    tt2[~mask] = -40.0 * torch.randn(int((~mask).sum()), DT)
    assert value(ts2, tt2, mask).item() == pytest.approx(base.item(), rel=1e-5)
    assert abs(value(ts2, tt2, torch.ones_like(mask)).item() - base.item()) > 1e-3


def test_every_library_loss_declares_what_it_reads():
    produces = {"image": ["pooled", "logits"], "text": ["pooled", "logits"]}
    from xmodal.losses import build_losses

    for name, params in LIBRARY.items():
        ls = build_losses([{"name": name, "params": params}])
        ls.check_inputs(produces, produces)
        needs = ls.losses[0].needs()
        assert needs, name
        assert {n.role for n in needs} <= {"student", "teacher"}

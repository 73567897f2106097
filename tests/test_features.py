"""Features validation and helpers."""

import pytest
import torch

from xmodal.features import Features, select_view


def test_valid_and_default_mask():
    f = Features(pooled=torch.randn(2, 4), tokens=torch.randn(2, 5, 4))
    assert f.mask.dtype == torch.bool and f.mask.all() and f.lengths.tolist() == [5, 5]
    assert f.batch_size == 2 and f.dim == 4


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"pooled": torch.randn(2, 3, 4)}, r"pooled must be a \[B, D\] tensor, got shape \[2, 3, 4\]"),
        ({"pooled": torch.randn(2, 4), "tokens": torch.randn(3, 5, 4)}, r"tokens must be \[B, T, D\] with B=2"),
        ({"pooled": torch.randn(2, 4), "tokens": torch.randn(2, 5, 4), "mask": torch.ones(2, 5)}, "bool tensor"),
        ({"pooled": torch.randn(2, 4), "tokens": torch.randn(2, 5, 4), "mask": torch.ones(2, 4, dtype=torch.bool)},
         r"mask shape \[2, 4\] does not match tokens"),
        ({"pooled": torch.randn(2, 4), "mask": torch.ones(2, 4, dtype=torch.bool)}, "mask was given without tokens"),
        ({"pooled": torch.randn(2, 4), "logits": torch.randn(3, 10)}, r"logits must be \[B, C\] or \[B, T, C\]"),
    ],
)
def test_invalid_shapes_raise_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Features(**kwargs)


def test_map_detach_to_index():
    p = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    f = Features(pooled=p, tokens=torch.randn(3, 3, 4), mask=mask, logits=torch.randn(3, 3, 7))
    assert not f.detach().pooled.requires_grad
    half = f.to(torch.float16)
    assert half.pooled.dtype == torch.float16 and half.mask.dtype == torch.bool
    sub = f.index(torch.tensor([0, 2]))
    assert sub.batch_size == 2 and sub.lengths.tolist() == [2, 3] and sub.logits.shape == (2, 3, 7)
    assert f.lengths.tolist() == [2, 1, 3]


def test_projected_view_and_logit_scale():
    p = torch.randn(3, 4, requires_grad=True)
    proj = Features(pooled=torch.randn(3, 6), tokens=torch.randn(3, 2, 6))
    f = Features(pooled=p, logit_scale=torch.tensor(14.0), projected=proj)
    assert f.view("projected") is proj and f.view("native").projected is None
    assert f.view("native").pooled is p and f.view("native").logit_scale is f.logit_scale
    plain = Features(pooled=torch.randn(3, 4))
    assert plain.view("projected") is plain and plain.view("native") is plain
    sub = f.index(torch.tensor([0, 2]))
    assert sub.pooled.shape == (2, 4) and sub.projected.tokens.shape == (2, 2, 6) and sub.logit_scale.item() == 14.0
    d = f.detach().to(torch.float64)
    assert not d.pooled.requires_grad and d.projected.pooled.dtype == torch.float64
    assert "pooled [3, 4] (projected: pooled [3, 6], tokens [3, 2, 6])" == f.describe()
    outs = {"image": f, "text": plain}
    assert select_view({"text": plain}, "native") == {"text": plain}
    assert select_view(outs, "projected")["image"] is proj and select_view(None, "native") is None
    with pytest.raises(ValueError, match="view must be one of"):
        f.view("teacher")
    with pytest.raises(ValueError, match="projected holds 2 samples, pooled holds 3"):
        Features(pooled=p, projected=Features(pooled=torch.randn(2, 6)))
    with pytest.raises(ValueError, match="without a projected view of its own"):
        Features(pooled=p, projected=f)
    with pytest.raises(ValueError, match="logit_scale must be a one-element tensor"):
        Features(pooled=p, logit_scale=torch.ones(3))

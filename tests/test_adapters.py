"""Adapters and the alignment space: projections map differing teacher/student widths into one space."""

import pytest
import torch

from xmodal.adapters import ImageAdapter, TextAdapter
from xmodal.alignment import PROJECTIONS, AlignmentSpace
from xmodal.errors import ConfigError, DataError


def batch(n=3):
    return {"image": torch.randn(n, 3, 32, 32), "text": torch.randint(0, 49408, (n, 16))}


def test_projection_shapes_with_differing_widths(tiny_clip):
    teacher, student = tiny_clip(embed_dim=48, width=64), tiny_clip(embed_dim=24, width=32)
    space = AlignmentSpace(dim=48)
    t_img = space.attach("teacher", ImageAdapter(teacher, frozen=True))
    t_txt = space.attach("teacher", TextAdapter(teacher, frozen=True))
    s_img = space.attach("student", ImageAdapter(student))
    s_txt = space.attach("student", TextAdapter(student), kind="mlp")
    assert (t_img.width, s_img.width) == (48, 24)
    assert isinstance(t_img.projection, torch.nn.Identity)  # same width → identity by default
    b = batch()
    for adapter in (t_img, t_txt, s_img, s_txt):
        out = adapter(b)
        assert out.view("projected").pooled.shape == (3, 48)
        assert out.pooled.shape == out.view("native").pooled.shape == (3, adapter.width)
        torch.testing.assert_close(out.pooled, adapter.encode(b).pooled)
    assert t_img(b).projected is None  # identity: both views are the native features
    out = space.encode("student", b)
    assert set(out) == {"image", "text"} and out["text"].pooled.shape == (3, 24)
    assert out["text"].projected.pooled.shape == (3, 48)
    torch.testing.assert_close(out["image"].projected.pooled, s_img.projection(out["image"].pooled))


def test_frozen_teacher_has_no_grad_and_stays_eval(tiny_clip):
    teacher = tiny_clip()
    adapter = ImageAdapter(teacher, frozen=True)
    adapter.train()
    assert not adapter.encoder.training
    assert not any(p.requires_grad for p in adapter.encoder.parameters())
    f = adapter(batch())
    assert not f.pooled.requires_grad and not f.pooled.is_inference()


def test_student_gradients_flow_through_projection(tiny_clip):
    space = AlignmentSpace(dim=16)
    s = space.attach("student", ImageAdapter(tiny_clip(embed_dim=32)))
    s(batch()).view("projected").pooled.sum().backward()
    assert s.projection.weight.grad is not None
    assert s.encoder.visual.conv1.weight.grad is not None


def test_errors(tiny_clip):
    adapter = ImageAdapter(tiny_clip())
    with pytest.raises(DataError, match=r"reads batch\['image'\] but the batch has keys: text"):
        adapter({"text": torch.zeros(1, 16, dtype=torch.long)})
    space = AlignmentSpace(dim=8)
    with pytest.raises(ConfigError, match="needs equal widths, got 32 → 8"):
        space.attach("student", adapter, kind="identity")
    with pytest.raises(ConfigError, match="unknown projection 'linaer'.*did you mean 'linear'"):
        space.attach("student", adapter, kind="linaer")
    with pytest.raises(ConfigError, match="no projection for teacher.image"):
        space.project("teacher", "image", adapter.encode(batch()))
    assert {"identity", "linear", "mlp"} <= set(PROJECTIONS.names())

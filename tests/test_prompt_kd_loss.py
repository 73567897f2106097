"""The prompt_kd loss: T²·KL(p_t ‖ p_s) over stored class vectors, batch mean, symmetric and CE options."""

from collections.abc import Mapping

import pytest
import torch

from xmodal.errors import ConfigError, DataError
from xmodal.features import NATIVE, Features
from xmodal.losses import LOSSES, Need, build_losses


def outs(logits):
    return {"image": Features(pooled=torch.zeros(logits.shape[0], 4), logits=logits)}


def loss_of(zs, zt, batch=None, **params):
    return LOSSES.build("prompt_kd", **params)(outs(zs), outs(zt), batch).loss


def test_registered_with_its_view_and_declared_inputs():
    loss = LOSSES.build("prompt_kd")
    assert loss.view == NATIVE  # the student's native features are norm(g(s(x))): evaluation uses the projector
    assert loss.needs() == [Need("student", "image", "logits"), Need("teacher", "image", "logits")]
    clip_produces = {"image": ("pooled",), "text": ("pooled",)}
    with pytest.raises(ConfigError, match="prompt_kd.*student image.logits"):
        build_losses([{"name": "prompt_kd"}]).check_inputs(clip_produces, clip_produces)
    build_losses([{"name": "prompt_kd"}]).check_inputs({"image": ("pooled", "logits")}, {"image": ("pooled", "logits")})


@pytest.mark.parametrize("mode", ["forward", "symmetric"])
def test_zero_when_student_logits_equal_teacher_logits(mode):
    z = torch.randn(6, 10) * 5
    assert loss_of(z.clone().requires_grad_(), z, mode=mode).abs().item() < 1e-6


def test_matches_a_direct_computation_of_the_formula():
    torch.manual_seed(0)
    zs, zt, t = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3, 2.0
    p_t, log_p_t, log_p_s = (zt / t).softmax(-1), (zt / t).log_softmax(-1), (zs / t).log_softmax(-1)
    expected = t * t * (p_t * (log_p_t - log_p_s)).sum(dim=1).mean()  # summed over classes, mean over the batch
    assert torch.allclose(loss_of(zs, zt, temperature=t), expected, atol=1e-6)
    p_s = (zs / t).softmax(-1)
    reverse = t * t * (p_s * (log_p_s - log_p_t)).sum(dim=1).mean()
    assert torch.allclose(loss_of(zs, zt, temperature=t, mode="symmetric"), 0.5 * (expected + reverse), atol=1e-6)


def test_value_does_not_scale_with_the_number_of_classes():
    torch.manual_seed(1)
    zs, zt = torch.randn(4, 6) * 2, torch.randn(4, 6) * 2
    small = loss_of(zs, zt)
    for k in (2, 5):  # every class repeated k times: the same distributions over k times as many classes
        big = loss_of(zs.repeat(1, k), zt.repeat(1, k))
        assert torch.allclose(big, small, atol=1e-5), (k, big, small)
    assert small > 0.05


def test_gradient_reaches_the_student_only():
    zs, zt = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    loss_of(zs, zt).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None


class NoLabels(Mapping):
    """A batch that fails the test if anything asks for its labels."""

    def __init__(self):
        self.data = {"ids": ["a", "b", "c"]}

    def __getitem__(self, key):
        if key == "label":
            raise AssertionError("the loss read labels")
        return self.data[key]

    def __contains__(self, key):
        if key == "label":
            raise AssertionError("the loss looked for labels")
        return key in self.data

    def __iter__(self):
        return iter(self.data)

    def __len__(self):
        return len(self.data)

    def get(self, key, default=None):
        if key == "label":
            raise AssertionError("the loss read labels")
        return self.data.get(key, default)


def test_no_labels_are_read_unless_the_cross_entropy_term_is_on():
    zs, zt = torch.randn(3, 5), torch.randn(3, 5)
    plain = LOSSES.build("prompt_kd")
    assert plain.batch_keys() == [] and not plain.reads_labels
    plain(outs(zs), outs(zt), NoLabels())
    with pytest.raises(DataError, match="batch\\['label'\\]"):
        loss_of(zs, zt, {"ids": ["a", "b", "c"]}, ce_weight=0.5)


def test_cross_entropy_term_with_labels():
    torch.manual_seed(2)
    zs, zt, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    out = LOSSES.build("prompt_kd", ce_weight=0.5)(outs(zs), outs(zt), {"label": y})
    kd = loss_of(zs, zt)
    ce = torch.nn.functional.cross_entropy(zs, y)
    assert torch.allclose(out.loss, kd + 0.5 * ce, atol=1e-6)
    assert set(out.parts) == {"kd", "ce"}
    assert LOSSES.build("prompt_kd", ce_weight=0.5).batch_keys() == ["label"]


def test_bad_parameters_are_named():
    with pytest.raises(ConfigError, match="mode"):
        LOSSES.build("prompt_kd", mode="reverse")
    with pytest.raises(ConfigError, match="ce_weight"):
        LOSSES.build("prompt_kd", ce_weight=-1)
    with pytest.raises(ConfigError, match="temperature"):
        LOSSES.build("prompt_kd", temperature=0)

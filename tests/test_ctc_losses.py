"""Supervised CTC, attention cross-entropy and CTC distillation (Afouras et al.) against direct computation."""

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import LOSSES
from xmodal.seqalign import lengths_to_mask, time_resample


def seq_feats(logits, lengths):
    mask = lengths_to_mask(torch.tensor(lengths), logits.shape[1])
    return Features(pooled=logits.mean(1), tokens=logits, mask=mask, logits=logits)


def test_ctc_matches_torch_and_skips_samples_without_transcript():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 6, requires_grad=True)
    student = {"video": seq_feats(logits, [10, 8, 9])}
    targets = torch.tensor([[2, 3, 4], [5, -1, -1], [-1, -1, -1]])
    out = LOSSES.build("ctc")(student, None, {"targets": targets})
    lp = logits[:2].log_softmax(-1).transpose(0, 1)
    expected = F.ctc_loss(lp, torch.tensor([[2, 3, 4], [5, 0, 0]]), torch.tensor([10, 8]), torch.tensor([3, 1]),
                          reduction="mean")
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert logits.grad[1, 8:].abs().sum() == 0  # padded frames get no gradient


def test_ctc_padding_does_not_matter_and_empty_batch_is_zero():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 5)
    targets = torch.tensor([[2, 3], [4, -1]])
    loss = LOSSES.build("ctc")
    a = loss({"video": seq_feats(logits, [6, 4])}, None, {"targets": targets}).loss
    changed = logits.clone()
    changed[1, 4:] = 100.0
    b = loss({"video": seq_feats(changed, [6, 4])}, None, {"targets": targets}).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    x = torch.randn(2, 6, 5, requires_grad=True)
    zero = loss({"video": seq_feats(x, [6, 6])}, None, {"targets": torch.full((2, 3), -1)}).loss
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ConfigError, match="needs batch\\['targets'\\]"):
        loss({"video": seq_feats(logits, [6, 4])}, None, {})


def test_attention_ce_with_label_smoothing():
    torch.manual_seed(2)
    targets = torch.tensor([[4, 5, 6], [7, -1, -1], [-1, -1, -1]])
    logits = torch.randn(3, 4, 9, requires_grad=True)  # L + 1 decoder steps
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    student = {"video_context": Features(pooled=torch.zeros(3, 2), tokens=torch.zeros(3, 4, 2), mask=mask,
                                         logits=logits)}
    out = LOSSES.build("attention_ce", label_smoothing=0.1)(student, None, {"targets": targets})
    s0 = F.cross_entropy(logits[0], torch.tensor([4, 5, 6, 1]), label_smoothing=0.1)
    s1 = F.cross_entropy(logits[1, :2], torch.tensor([7, 1]), label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(((s0 + s1) / 2).item(), rel=1e-5)
    assert 0.0 <= out.parts["acc"].item() <= 1.0
    out.loss.backward()
    assert logits.grad[2].abs().sum() == 0 and logits.grad[1, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="do not match targets"):
        LOSSES.build("attention_ce")(student, None, {"targets": targets[:, :2]})


def peaky(paths, vocab=6, scale=8.0):
    t = max(len(p) for p in paths)
    x = torch.zeros(len(paths), t, vocab)
    for b, p in enumerate(paths):
        for i, lab in enumerate(p):
            x[b, i, lab] = scale
    return x


def test_ctc_kd_uses_teacher_transcripts_and_frame_kl_without_ground_truth():
    torch.manual_seed(3)
    t_logits = peaky([[2, 2, 0, 3, 3, 0, 4, 0], [5, 0, 5, 5, 0, 0, 0, 0]])
    teacher = {"audio": seq_feats(t_logits, [8, 6])}
    s_logits = torch.randn(2, 4, 6, requires_grad=True)
    student = {"video": seq_feats(s_logits, [4, 3])}
    out = LOSSES.build("ctc_kd", kl_weight=0.5)(student, teacher)  # no batch, no ground truth
    # pseudo labels: greedy teacher transcripts "2 3 4" and "5 5"
    lp = s_logits.log_softmax(-1).transpose(0, 1)
    ctc = F.ctc_loss(lp, torch.tensor([[2, 3, 4], [5, 5, 0]]), torch.tensor([4, 3]), torch.tensor([3, 2]),
                     reduction="mean", zero_infinity=True)
    tm, sm = teacher["audio"].mask, student["video"].mask
    p_t = time_resample(t_logits.softmax(-1), tm, sm).values
    kl = (p_t * (p_t.clamp_min(1e-12).log() - s_logits.log_softmax(-1))).sum(-1)
    kl = ((kl * sm).sum(1) / sm.sum(1)).mean()
    assert out.parts["ctc"].item() == pytest.approx(ctc.item(), rel=1e-5)
    assert out.parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(ctc.item() + 0.5 * kl.item(), rel=1e-5)
    out.loss.backward()
    assert s_logits.grad is not None and s_logits.grad[1, 3].abs().sum() == 0


def test_ctc_kd_kl_is_zero_when_student_matches_aligned_teacher():
    t_logits = torch.randn(2, 6, 5)
    teacher = {"audio": seq_feats(t_logits, [6, 4])}
    student = {"video": seq_feats(t_logits.clone().requires_grad_(True), [6, 4])}
    out = LOSSES.build("ctc_kd", ctc_weight=0.0, aligner="identity")(student, teacher)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    teacher_grad = t_logits.clone().requires_grad_(True)
    out = LOSSES.build("ctc_kd")(student, {"audio": seq_feats(teacher_grad, [6, 4])})
    out.loss.backward()
    assert teacher_grad.grad is None


def test_ctc_kd_sample_weight_and_vocab_mismatch():
    t_logits = peaky([[2, 0, 3, 0], [4, 0, 0, 0]])
    s_logits = torch.randn(2, 4, 6)
    loss = LOSSES.build("ctc_kd")
    a = loss({"video": seq_feats(s_logits, [4, 4])}, {"audio": seq_feats(t_logits, [4, 4])},
             {"sample_weight": torch.tensor([1.0, 0.0])})
    b = loss({"video": seq_feats(s_logits[:1], [4])}, {"audio": seq_feats(t_logits[:1], [4])})
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="same label set"):
        loss({"video": seq_feats(torch.randn(2, 4, 7), [4, 4])}, {"audio": seq_feats(t_logits, [4, 4])})

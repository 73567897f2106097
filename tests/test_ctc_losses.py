"""Supervised CTC, attention cross-entropy and CTC distillation (Afouras et al.) against direct computation."""

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError, DataError
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


def direct_ctc(logits, frames, target):
    """CTC of one sample written with torch's own function, divided by the target length."""
    lp = logits[:frames].log_softmax(-1).unsqueeze(1)
    value = F.ctc_loss(lp, torch.tensor([target]), torch.tensor([frames]), torch.tensor([len(target)]),
                       reduction="sum")
    return value / len(target)


def test_ctc_leaves_infeasible_samples_out_of_the_mean(caplog):
    """A transcript longer than its input allows (or with repeats that need separating blanks) has no alignment:
    it is neither averaged in as 0 nor hidden; the mean is over the feasible labelled samples only."""
    torch.manual_seed(4)
    logits = torch.randn(4, 6, 7, requires_grad=True)
    targets = torch.tensor([[2, 3, 4, -1, -1, -1, -1],  # feasible: 3 labels in 6 frames
                            [2, 3, 4, 5, 6, 2, 3],      # 7 labels in 6 frames: infeasible
                            [2, 2, 3, 3, -1, -1, -1],   # 4 labels + 2 separating blanks = 6 > 5 frames: infeasible
                            [5, 5, 6, -1, -1, -1, -1]])  # 3 + 1 = 4 <= 4 frames: feasible
    lengths = [6, 6, 5, 4]
    batch = {"targets": targets, "ids": ["ok", "too-long", "repeats", "tight"]}
    with caplog.at_level("WARNING", logger="xmodal.losses.ctc"):
        out = LOSSES.build("ctc")({"video": seq_feats(logits, lengths)}, None, batch)
    expected = (direct_ctc(logits[0], 6, [2, 3, 4]) + direct_ctc(logits[3], 4, [5, 5, 6])) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.parts["labelled"].item() == 4 and out.parts["infeasible"].item() == 2
    assert "'too-long' (6 frames, needs 7)" in caplog.text and "'repeats' (5 frames, needs 6)" in caplog.text
    out.loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[2].abs().sum() == 0


def test_ctc_batch_without_any_feasible_sample_is_an_error_not_a_zero():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[2, 3, 4, 5], [6, 6, 6, -1]])
    with pytest.raises(DataError, match=r"no labelled sample.*'a' \(3 frames, needs 4\).*'b' \(3 frames, needs 5\)"):
        LOSSES.build("ctc")({"video": seq_feats(logits, [3, 3])}, None, {"targets": targets, "ids": ["a", "b"]})


def test_supervised_losses_count_the_labelled_samples_they_saw():
    torch.manual_seed(5)
    targets = torch.tensor([[4, 5], [-1, -1], [6, -1]])
    ctc = LOSSES.build("ctc")({"video": seq_feats(torch.randn(3, 6, 9), [6, 6, 6])}, None, {"targets": targets})
    assert ctc.parts["labelled"].item() == 2
    ctx = Features(pooled=torch.zeros(3, 2), tokens=torch.zeros(3, 3, 2), mask=torch.ones(3, 3, dtype=torch.bool),
                   logits=torch.randn(3, 3, 9, requires_grad=True))
    ce = LOSSES.build("attention_ce")({"video_context": ctx}, None, {"targets": targets})
    assert ce.parts["labelled"].item() == 2
    none = LOSSES.build("attention_ce")({"video_context": ctx}, None, {"targets": torch.full((3, 2), -1)})
    assert none.loss.item() == 0.0 and none.loss.requires_grad and none.parts["labelled"].item() == 0
    assert LOSSES.get("ctc").supervised and LOSSES.get("attention_ce").supervised
    assert not getattr(LOSSES.get("ctc_kd"), "supervised", False)


def test_ctc_kd_leaves_infeasible_pseudo_labels_out_of_its_ctc_term():
    t_logits = peaky([[2, 0, 3, 0, 4, 0], [2, 0, 2, 0, 2, 0]])  # teacher transcripts [2, 3, 4] and [2, 2, 2]
    teacher = {"audio": seq_feats(t_logits, [6, 6])}
    torch.manual_seed(6)
    s_logits = torch.randn(2, 4, 6)
    student = {"video": seq_feats(s_logits, [4, 4])}  # [2, 2, 2] needs 5 frames
    out = LOSSES.build("ctc_kd", kl_weight=0.0)(student, teacher, {})
    assert out.parts["ctc"].item() == pytest.approx(direct_ctc(s_logits[0], 4, [2, 3, 4]).item(), rel=1e-5)
    assert out.parts["ctc_infeasible"].item() == 1

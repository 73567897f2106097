"""LIBS losses against design.md formulas, zero at the aligned teacher, masks, gradients and teacher filtering."""

import math

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import LOSSES, build_losses
from xmodal.losses.libs import TeacherFilter
from xmodal.seqalign import lengths_to_mask, rate_stack


def feats(tokens, lengths, logits=None):
    mask = lengths_to_mask(torch.tensor(lengths), tokens.shape[1])
    m = mask.float().unsqueeze(-1)
    pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1)
    return Features(pooled=pooled, tokens=tokens, mask=mask, logits=logits)


def make(seed=0, d=4):
    torch.manual_seed(seed)
    teacher = feats(torch.randn(3, 8, d), [8, 6, 4])
    student = feats(torch.randn(3, 4, d, requires_grad=True), [4, 3, 2])
    return student, teacher


def direct_frame(student, teacher):
    """mean_b mean_j ‖ã_j − s_j‖², ã_j = Σ_i softmax_i(⟨s_j, t_i⟩/√d) t_i, written out with loops."""
    d = student.tokens.shape[-1]
    per = []
    for b in range(student.batch_size):
        lv, la = int(student.mask[b].sum()), int(teacher.mask[b].sum())
        s, t = student.tokens[b].detach(), teacher.tokens[b]
        terms = []
        for j in range(lv):
            w = torch.softmax(torch.stack([s[j] @ t[i] / math.sqrt(d) for i in range(la)]), 0)
            a = sum(w[i] * t[i] for i in range(la))
            terms.append(((a - student.tokens[b, j]) ** 2).sum())
        per.append(torch.stack(terms).mean())
    return torch.stack(per).mean()


def test_libs_frame_matches_formula_and_grads_reach_student_only():
    student, teacher = make()
    teacher.tokens.requires_grad_(True)
    loss = LOSSES.build("libs_frame")
    out = loss({"video": student}, {"audio": teacher})
    assert out.loss.item() == pytest.approx(direct_frame(student, teacher).item(), rel=1e-5)
    out.loss.backward()
    assert student.tokens.grad is not None and student.tokens.grad.abs().sum() > 0
    assert teacher.tokens.grad is None


def test_libs_sequence_matches_formula():
    student, teacher = make(1)
    out = LOSSES.build("libs_sequence")({"video": student}, {"audio": teacher})
    expected = ((student.pooled - teacher.pooled) ** 2).sum(-1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_libs_context_reads_context_keys():
    student, teacher = make(2)
    loss = LOSSES.build("libs_context", aligner="attention")
    out = loss({"video_context": student}, {"audio_context": teacher})
    assert out.loss.item() == pytest.approx(direct_frame(student, teacher).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="needs student features for modality 'video_context'"):
        loss({"video": student}, {"audio_context": teacher})


def test_every_libs_loss_is_zero_at_the_aligned_teacher():
    torch.manual_seed(3)
    teacher = feats(torch.randn(2, 8, 4), [8, 6])
    aligned = rate_stack(teacher.tokens, teacher.mask, lengths_to_mask(torch.tensor([4, 3]), 4))
    student = feats(aligned.values.clone(), [4, 3])
    frame = LOSSES.build("libs_frame", aligner="rate_stack")({"video": student}, {"audio": teacher})
    assert frame.loss.item() == 0.0
    seq = LOSSES.build("libs_sequence")({"video": student}, {"audio": student.detach()})
    assert seq.loss.item() == 0.0
    ctx = LOSSES.build("libs_context", aligner="identity")({"video_context": student},
                                                            {"audio_context": student.detach()})
    assert ctx.loss.item() == 0.0
    # LIBS attention: orthogonal, large teacher states make the alignment a lookup; the student equal to the
    # looked-up states gives (numerically) zero
    keys = torch.eye(4)[None].repeat(2, 1, 1) * 30
    t = feats(keys, [4, 3])
    s = feats(keys[:, [1, 0, 2]].clone(), [3, 2])
    att = LOSSES.build("libs_frame")({"video": s}, {"audio": t})
    assert att.loss.item() < 1e-6
    total = LOSSES.build("libs", aligner="rate_stack", context_aligner="identity")(
        {"video": student, "video_context": student}, {"audio": teacher, "audio_context": student.detach()}
    )
    assert total.loss.item() == pytest.approx(((student.pooled - teacher.pooled) ** 2).sum(-1).mean().item())


def decoder_states(seed=7, lengths=(6, 4, 1), d=8):
    """Decoder-context-like Features: states [B, L+1, D] over teacher-forced steps, padding zeroed."""
    torch.manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), d)
    out = feats(tokens, list(lengths))
    return out.replace(tokens=tokens.masked_fill(~out.mask.unsqueeze(-1), 0.0))


def test_context_level_aligns_decoder_steps_one_to_one_by_default():
    """Both decoders are teacher-forced on the same transcript: a student equal to the teacher has context loss 0
    (attention alignment would blur each step with the others and give a positive loss)."""
    teacher = decoder_states()
    student = teacher.replace(tokens=teacher.tokens.clone().requires_grad_(True))
    ctx = LOSSES.build("libs_context")({"video_context": student}, {"audio_context": teacher})
    assert ctx.loss.item() == 0.0
    total = LOSSES.build("libs", frame_weight=0.0, sequence_weight=0.0)(
        {"video_context": student}, {"audio_context": teacher})
    assert total.parts["context"].item() == 0.0
    attention = LOSSES.build("libs_context", aligner="attention")({"video_context": student},
                                                                    {"audio_context": teacher})
    assert attention.loss.item() > 0.01  # what the identity default avoids
    # a moved student step is measured against the teacher's state at that same step
    moved = student.tokens.detach().clone()
    moved[0, 2] += 1.0
    out = LOSSES.build("libs_context")({"video_context": student.replace(tokens=moved)}, {"audio_context": teacher})
    assert out.loss.item() == pytest.approx((1.0 * 8 / 6 + 0 + 0) / 3, rel=1e-6)


def test_identity_context_tolerates_different_padding_widths():
    """A cached teacher is padded to its own batch maximum: extra padding is trimmed, missing padding added."""
    teacher = decoder_states(lengths=(3, 2))
    wider = Features(pooled=teacher.pooled, tokens=torch.cat([teacher.tokens, torch.zeros(2, 2, 8)], 1),
                     mask=torch.cat([teacher.mask, torch.zeros(2, 2, dtype=torch.bool)], 1))
    loss = LOSSES.build("libs_context")
    assert loss({"video_context": teacher}, {"audio_context": wider}).loss.item() == 0.0
    assert loss({"video_context": wider}, {"audio_context": teacher}).loss.item() == 0.0
    cut = decoder_states(lengths=(5, 2))
    with pytest.raises(ValueError, match="'identity' aligner needs equal lengths"):
        loss({"video_context": teacher}, {"audio_context": cut})


def test_libs_passes_aligner_params_to_its_context_term():
    student, teacher = make(6)
    s = {"video": student, "video_context": student}
    t = {"audio": teacher, "audio_context": teacher}
    sharp = {"temperature": 0.05}
    alone = LOSSES.build("libs_context", aligner="attention", aligner_params=sharp)(
        {"video_context": student}, {"audio_context": teacher}).loss
    default_temp = LOSSES.build("libs_context", aligner="attention")(
        {"video_context": student}, {"audio_context": teacher}).loss
    assert abs(alone.item() - default_temp.item()) > 1e-3  # the temperature matters here
    shared = LOSSES.build("libs", aligner="attention", aligner_params=sharp, context_aligner="attention")(s, t)
    assert shared.parts["context"].item() == pytest.approx(alone.item(), rel=1e-6)
    own = LOSSES.build("libs", aligner="time", context_aligner="attention", context_aligner_params=sharp)(s, t)
    assert own.parts["context"].item() == pytest.approx(alone.item(), rel=1e-6)
    # the frame aligner's parameters do not go to a different context aligner (identity takes none)
    other = LOSSES.build("libs", aligner="attention", aligner_params=sharp)
    assert type(other.terms["context"].aligner).__name__ == "IdentityAligner"


def test_masks_really_mask():
    student, teacher = make(4)
    losses = [LOSSES.build(n) for n in ("libs_frame", "libs_sequence")]
    ref = [loss({"video": student}, {"audio": teacher}).loss.item() for loss in losses]
    s_tok, t_tok = student.tokens.detach().clone(), teacher.tokens.clone()
    s_tok[~student.mask] = 1e3
    t_tok[~teacher.mask] = -1e3
    s2 = Features(pooled=student.pooled, tokens=s_tok, mask=student.mask)
    t2 = Features(pooled=teacher.pooled, tokens=t_tok, mask=teacher.mask)
    got = [loss({"video": s2}, {"audio": t2}).loss.item() for loss in losses]
    assert got == pytest.approx(ref, rel=1e-6)


def test_libs_total_is_weighted_sum_of_parts():
    student, teacher = make(5)
    s = {"video": student, "video_context": student}
    t = {"audio": teacher, "audio_context": teacher}
    out = LOSSES.build("libs", frame_weight=0.5, sequence_weight=2.0, context_weight=0.25,
                       context_aligner="attention")(s, t)
    p = out.parts
    assert set(p) == {"frame", "sequence", "context"}
    expected = 0.5 * p["frame"] + 2.0 * p["sequence"] + 0.25 * p["context"]
    assert out.loss.item() == pytest.approx(expected.item())
    no_ctx = LOSSES.build("libs", context_weight=0.0)({"video": student}, {"audio": teacher})
    assert "context" not in no_ctx.parts
    with pytest.raises(ConfigError, match="all 0"):
        LOSSES.build("libs", frame_weight=0, sequence_weight=0, context_weight=0)(s, t)
    with pytest.raises(ConfigError, match="unknown parameter 'frame_wieght'"):
        build_losses([{"name": "libs", "params": {"frame_wieght": 1.0}}])


def test_distance_options_match_direct_computation_and_cosine_is_scale_invariant():
    student, teacher = make(6)
    s, t = student.pooled, teacher.pooled
    d = s.shape[-1]
    direct = {
        "squared": ((s - t) ** 2).sum(-1).mean(),
        "mean_squared": ((s - t) ** 2).sum(-1).mean() / d,
        "cosine": (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean(),
    }
    for kind, expected in direct.items():
        out = LOSSES.build("libs_sequence", distance=kind)({"video": student}, {"audio": teacher})
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5), kind
    # frame level, cosine: per real frame 1 − cos(ã_j, s_j), with ã from the rate-stack aligner
    teacher8 = feats(torch.randn(3, 8, 4), [8, 6, 4])
    aligned = rate_stack(teacher8.tokens, teacher8.mask, student.mask)
    cos = torch.nn.functional.cosine_similarity(aligned.values, student.tokens, dim=-1)
    per = [(1 - cos[b, : int(student.mask[b].sum())]).mean() for b in range(3)]
    frame = LOSSES.build("libs_frame", aligner="rate_stack", distance="cosine")
    assert frame({"video": student}, {"audio": teacher8}).loss.item() == pytest.approx(
        torch.stack(per).mean().item(), rel=1e-5)
    # scaling the teacher's states by 100 changes nothing; the student at any positive multiple of the teacher
    # scores zero; gradients still reach the student only
    big = Features(pooled=teacher.pooled * 100, tokens=teacher.tokens * 100, mask=teacher.mask)
    for name in ("libs_sequence", "libs_frame"):
        loss = LOSSES.build(name, distance="cosine", **({"aligner": "rate_stack"} if name == "libs_frame" else {}))
        a = loss({"video": student}, {"audio": teacher8 if name == "libs_frame" else teacher}).loss
        b = loss({"video": student}, {"audio": Features(pooled=teacher8.pooled * 100, tokens=teacher8.tokens * 100,
                                                        mask=teacher8.mask) if name == "libs_frame" else big}).loss
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    same = feats((aligned.values * 3).detach().requires_grad_(True), [4, 3, 2])
    zero = LOSSES.build("libs_frame", aligner="rate_stack", distance="cosine")({"video": same}, {"audio": teacher8})
    assert zero.loss.item() == pytest.approx(0.0, abs=1e-6)
    total = LOSSES.build("libs", aligner="rate_stack", context_weight=0, distance="cosine")(
        {"video": student}, {"audio": teacher8})
    total.loss.backward()
    assert student.tokens.grad.abs().sum() > 0 and teacher8.tokens.grad is None
    seq = LOSSES.build("libs_sequence", distance="cosine")({"video": student}, {"audio": teacher8})
    assert total.parts["sequence"].item() == pytest.approx(seq.loss.item())
    with pytest.raises(ConfigError, match="LIBS distance must be"):
        LOSSES.build("libs", distance="l1")


# ---------------------------------------------------------------- teacher filtering


def teacher_with_paths(paths, vocab=8):
    t = max(len(p) for p in paths)
    logits = torch.zeros(len(paths), t, vocab)
    for b, p in enumerate(paths):
        for i, lab in enumerate(p):
            logits[b, i, lab] = 10.0
    tokens = torch.randn(len(paths), t, 4)
    return feats(tokens, [len(p) for p in paths], logits)


def filter_batch():
    # references: "23" for samples 0-2, sample 3 has no transcript
    teacher = teacher_with_paths([[2, 0, 3], [2, 2, 0], [4, 5, 6], [2, 3, 0]])  # hyps: 23, 2, 456, 23
    targets = torch.tensor([[2, 3], [2, 3], [2, 3], [-1, -1]])
    return teacher, {"targets": targets, "target_lengths": torch.tensor([2, 2, 2, 0])}


def test_hard_filter_drops_samples_above_threshold():
    teacher, batch = filter_batch()
    res = TeacherFilter("hard", max_cer=0.3)(teacher, batch)
    assert res.cer[:3].tolist() == [0.0, 0.5, 1.5] and math.isnan(res.cer[3])
    assert res.weight.tolist() == [1.0, 0.0, 0.0, 1.0]  # unlabeled samples cannot be judged: kept
    assert res.accept_rate.item() == pytest.approx(1 / 3)


def test_soft_filter_weights_by_exp_minus_r_cer():
    teacher, batch = filter_batch()
    res = TeacherFilter("soft", rate=2.0)(teacher, batch)
    expected = [1.0, math.exp(-1.0), math.exp(-3.0), 1.0]
    assert res.weight.tolist() == pytest.approx(expected)
    assert res.accept_rate.item() == pytest.approx(sum(expected[:3]) / 3)
    given = TeacherFilter("soft", rate=1.0)(teacher, {**batch, "teacher_cer": torch.tensor([0.0, 1.0, 2.0, 0.0])})
    assert given.weight.tolist() == pytest.approx([1.0, math.exp(-1), math.exp(-2), 1.0])


def test_filtered_loss_weights_samples_and_logs_accept_rate():
    teacher, batch = filter_batch()
    student = feats(torch.randn(4, 2, 4, requires_grad=True), [2, 2, 2, 1])
    base = LOSSES.build("libs_sequence")
    per = ((student.pooled - teacher.pooled) ** 2).sum(-1)
    hard = LOSSES.build("libs_sequence", filter="hard", max_cer=0.3)({"video": student}, {"audio": teacher}, batch)
    assert hard.loss.item() == pytest.approx(((per[0] + per[3]) / 2).item(), rel=1e-6)
    assert hard.parts["accept_rate"].item() == pytest.approx(1 / 3)
    hard.loss.backward()
    assert student.tokens.grad[1].abs().sum() == 0 and student.tokens.grad[0].abs().sum() > 0
    # an existing sample_weight multiplies with the filter's weights
    w = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = LOSSES.build("libs", filter="hard", max_cer=0.3, context_weight=0.0)({"video": student}, {"audio": teacher},
                                                           {**batch, "sample_weight": w})
    seq = out.parts["sequence"]
    assert seq.item() == pytest.approx(per[0].item(), rel=1e-6)
    assert "accept_rate" in out.parts
    unfiltered = base({"video": student}, {"audio": teacher}, batch)
    assert unfiltered.loss.item() == pytest.approx(per.mean().item(), rel=1e-6) and not unfiltered.parts


def test_filter_errors():
    with pytest.raises(ConfigError, match="'none', 'hard' or 'soft'"):
        TeacherFilter("medium")
    teacher, batch = filter_batch()
    with pytest.raises(ConfigError, match="needs batch\\['targets'\\]"):
        TeacherFilter("hard")(teacher, {})
    with pytest.raises(ConfigError, match="CTC logits"):
        TeacherFilter("hard")(teacher.replace(logits=None), batch)

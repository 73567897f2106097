"""Sequence alignment operators on hand-made sequences, with padding."""

import math

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.seqalign import (
    ALIGNERS,
    RateMismatchError,
    attention_align,
    attention_weights,
    ctc_greedy,
    ctc_posterior_align,
    ctc_segments,
    decoder_io,
    lengths_to_mask,
    pad_sequences,
    rate_stack,
    time_resample,
)


def seq(*rows, pad=999.0):
    """Rows of scalars → values [B, T, 1] padded with `pad` and the prefix mask."""
    t = max(len(r) for r in rows)
    x = torch.full((len(rows), t, 1), pad)
    for b, r in enumerate(rows):
        x[b, : len(r), 0] = torch.tensor(r, dtype=torch.float32)
    return x, lengths_to_mask(torch.tensor([len(r) for r in rows]), t)


# ---------------------------------------------------------------- rate stacking


def test_rate_stack_mean_and_concat_with_padding():
    audio, amask = seq([0, 1, 2, 3, 4, 5], [10, 11, 12, 13])
    vmask = lengths_to_mask(torch.tensor([3, 2]), 3)
    out = rate_stack(audio, amask, vmask)
    assert out.values.shape == (2, 3, 1)
    assert out.values[0, :, 0].tolist() == [0.5, 2.5, 4.5]
    assert out.values[1, :, 0].tolist() == [10.5, 12.5, 0.0]  # padded video frame is zero
    assert out.mask.tolist() == [[True, True, True], [True, True, False]]
    cat = rate_stack(audio, amask, vmask, mode="concat")
    assert cat.values.shape == (2, 3, 2)
    assert cat.values[0].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert cat.values[1].tolist() == [[10, 11], [12, 13], [0, 0]]


def test_rate_stack_pads_short_audio_and_ignores_padded_values():
    audio, amask = seq([1, 2, 3, 4, 5], [7, 8, 9])  # sample 0 lacks its last audio frame
    vmask = lengths_to_mask(torch.tensor([3, 2]), 3)
    out = rate_stack(audio, amask, vmask, ratio=2)
    assert out.values[0, :, 0].tolist() == [1.5, 3.5, 5.0]
    assert out.values[1, :, 0].tolist() == [7.5, 9.0, 0.0]
    audio2 = audio.clone()
    audio2[~amask] = -123.0
    assert torch.equal(rate_stack(audio2, amask, vmask, ratio=2).values, out.values)


def test_rate_stack_names_both_rates_when_they_do_not_divide():
    audio, amask = seq(list(range(9)))
    vmask = lengths_to_mask(torch.tensor([6]), 6)
    with pytest.raises(RateMismatchError, match="9 audio frames and 6 video frames"):
        rate_stack(audio, amask, vmask)
    vmask5 = lengths_to_mask(torch.tensor([5]), 5)
    with pytest.raises(RateMismatchError, match="audio rate 30 fps .* video rate 25 fps"):
        rate_stack(audio, amask, vmask5, audio_rate=30, video_rate=25)
    out = rate_stack(*seq(list(range(8))), lengths_to_mask(torch.tensor([2]), 2), audio_rate=100, video_rate=25)
    assert out.values[0, :, 0].tolist() == [1.5, 5.5]


# ---------------------------------------------------------------- attention


def test_attention_align_matches_formula_and_masks_padding():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4)
    k = torch.randn(2, 5, 4)
    v = torch.randn(2, 5, 6)
    amask = lengths_to_mask(torch.tensor([5, 3]), 5)
    vmask = lengths_to_mask(torch.tensor([3, 2]), 3)
    out = attention_align(q, k, v, amask, vmask)
    for b in range(2):
        la, lv = int(amask[b].sum()), int(vmask[b].sum())
        for j in range(lv):
            w = torch.softmax(torch.stack([q[b, j] @ k[b, i] / math.sqrt(4) for i in range(la)]), 0)
            expected = sum(w[i] * v[b, i] for i in range(la))
            assert torch.allclose(out.values[b, j], expected, atol=1e-6)
    assert torch.all(out.values[1, 2] == 0) and out.mask.tolist() == vmask.tolist()
    k2, v2 = k.clone(), v.clone()
    k2[1, 3:] = 50.0
    v2[1, 3:] = -50.0  # padded audio must not matter
    assert torch.allclose(attention_align(q, k2, v2, amask, vmask).values, out.values)
    w = attention_weights(q, k, amask, vmask)
    assert torch.all(w[1, :, 3:] == 0) and torch.allclose(w[0].sum(-1), torch.ones(3))


def test_attention_align_hard_case_and_empty_audio():
    keys = torch.eye(3)[None] * 20  # orthogonal, large: attention becomes a hard lookup
    query = keys[:, [2, 0]]
    out = attention_align(query, keys, audio_mask=torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(out.values, query, atol=1e-4)
    empty = attention_align(torch.randn(1, 2, 3), torch.randn(1, 4, 3), audio_mask=torch.zeros(1, 4, dtype=torch.bool))
    assert torch.all(empty.values == 0) and not empty.mask.any() and not torch.isnan(empty.values).any()
    with pytest.raises(ValueError, match="equal batch and width"):
        attention_align(torch.randn(1, 2, 3), torch.randn(1, 4, 5))


# ---------------------------------------------------------------- CTC posteriors and time


def one_hot_logits(paths, vocab=5, scale=10.0):
    t = max(len(p) for p in paths)
    x = torch.zeros(len(paths), t, vocab)
    for b, p in enumerate(paths):
        for i, lab in enumerate(p):
            x[b, i, lab] = scale
    return x, lengths_to_mask(torch.tensor([len(p) for p in paths]), t)


def test_ctc_segments_and_greedy():
    logits, mask = one_hot_logits([[2, 2, 0, 0, 3, 3, 3, 0], [4, 0, 4, 4]])
    seg = ctc_segments(logits.argmax(-1), mask)
    assert seg[0].tolist() == [0, 0, 1, 1, 2, 2, 2, 3]
    assert seg[1].tolist() == [0, 1, 2, 2, -1, -1, -1, -1]
    assert ctc_greedy(logits, mask) == [[2, 3], [4, 4]]


def test_ctc_posterior_align_by_token_segments_and_relative_time():
    logits, amask = one_hot_logits([[2, 2, 0, 0, 3, 3, 3, 0], [4, 4, 0, 1]])
    values = torch.arange(8, dtype=torch.float32)[None, :, None].repeat(2, 1, 1)
    values[1, 4:] = 777.0  # padding
    vmask = lengths_to_mask(torch.tensor([4, 2]), 4)
    out = ctc_posterior_align(logits, amask, vmask, values)
    # sample 0: video centres at audio frames 1, 3, 5, 7 → segments "22", "00", "333", "0"
    assert out.values[0, :, 0].tolist() == [0.5, 2.5, 5.0, 7.0]
    # sample 1 (4 real audio frames, 2 video frames): centres at audio frames 1 and 3 → "44" and "1"
    assert out.values[1, :, 0].tolist() == [0.5, 3.0, 0.0, 0.0]
    assert out.mask.tolist() == vmask.tolist()
    probs = ctc_posterior_align(logits, amask, vmask).values  # default: posteriors as probabilities
    assert torch.allclose(probs[0].sum(-1), torch.ones(4)) and probs[0, 2].argmax() == 3


def test_time_resample_averages_or_takes_nearest():
    audio, amask = seq([0, 1, 2, 3, 4, 5], [6, 8])
    vmask = lengths_to_mask(torch.tensor([3, 4]), 4)
    out = time_resample(audio, amask, vmask)
    assert out.values[0, :3, 0].tolist() == [0.5, 2.5, 4.5]  # 2 audio frames per video frame
    assert out.values[1, :, 0].tolist() == [6, 6, 8, 8]  # video faster: nearest audio frame
    assert out.mask.tolist() == vmask.tolist()


# ---------------------------------------------------------------- registry over Features


def test_registry_aligners_over_features():
    assert {"attention", "ctc", "identity", "rate_stack", "time"} <= set(ALIGNERS.names())
    audio, amask = seq([0, 1, 2, 3], [4, 5])
    teacher = Features(pooled=torch.zeros(2, 1), tokens=audio, mask=amask)
    student = Features(pooled=torch.zeros(2, 1), tokens=torch.zeros(2, 2, 1),
                       mask=lengths_to_mask(torch.tensor([2, 1]), 2))
    out = ALIGNERS.build("rate_stack")(teacher, student)
    assert out.values[:, :, 0].tolist() == [[0.5, 2.5], [4.5, 0.0]]
    ident = ALIGNERS.build("identity")(teacher.replace(tokens=audio[:, :2], mask=amask[:, :2]), student)
    assert ident.values[:, :, 0].tolist() == [[0.0, 1.0], [4.0, 0.0]]
    with pytest.raises(ValueError, match="needs equal lengths"):
        ALIGNERS.build("identity")(teacher, student)
    with pytest.raises(ValueError, match="teacher CTC logits"):
        ALIGNERS.build("ctc")(teacher, student)
    with pytest.raises(ConfigError, match="did you mean 'attention'"):
        ALIGNERS.build("atention")


def test_decoder_io_and_padding_helpers():
    targets = pad_sequences([[5, 6, 7], [8], []])
    assert targets.tolist() == [[5, 6, 7], [8, -1, -1], [-1, -1, -1]]
    inp, out, mask = decoder_io(targets, sos=1, eos=1)
    assert inp.tolist() == [[1, 5, 6, 7], [1, 8, 1, 1], [1, 1, 1, 1]]
    assert out.tolist() == [[5, 6, 7, 1], [8, 1, -1, -1], [-1, -1, -1, -1]]
    assert mask.sum(1).tolist() == [4, 2, 0]

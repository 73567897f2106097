"""CTC greedy, prefix beam search and joint CTC/attention decoding against hand-made lattices and brute force."""

import itertools
import math

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.seqalign import ctc_greedy, lengths_to_mask
from xmodal.tasks.lipread.decode import (
    DECODERS,
    CTCPrefixScorer,
    ctc_prefix_beam_search,
    decode_batch,
    joint_beam_search,
)


def collapse(path, blank=0):
    out, prev = [], None
    for c in path:
        if c != prev and c != blank:
            out.append(c)
        prev = c
    return tuple(out)


def labelling_probs(log_probs):
    """Exact p(y) for every labelling y, by enumerating all V^T paths."""
    t, v = log_probs.shape
    probs = {}
    for path in itertools.product(range(v), repeat=t):
        p = math.exp(sum(log_probs[i, c].item() for i, c in enumerate(path)))
        y = collapse(path)
        probs[y] = probs.get(y, 0.0) + p
    return probs


def test_prefix_beam_search_beats_greedy_on_the_classic_lattice():
    # two frames, P(blank) = 0.6, P(a) = 0.4: the best path is "blank blank" (0.36, empty output), but "a" has
    # probability 0.24 + 0.24 + 0.16 = 0.64 spread over three paths
    lp = torch.tensor([[[0.6, 0.4], [0.6, 0.4]]]).log()
    assert ctc_greedy(lp) == [[]]
    best = ctc_prefix_beam_search(lp[0], beam_size=4)
    assert best[0][0] == (1,) and math.exp(best[0][1]) == pytest.approx(0.64)
    assert best[1][0] == () and math.exp(best[1][1]) == pytest.approx(0.36)
    assert decode_batch(lambda x, m: (x, torch.ones(1, 2, dtype=torch.bool), x), lp, decoder="beam") == [[1]]


def test_prefix_beam_search_matches_brute_force():
    torch.manual_seed(0)
    lp = torch.randn(5, 4).log_softmax(-1)
    exact = sorted(labelling_probs(lp).items(), key=lambda kv: -kv[1])
    found = ctc_prefix_beam_search(lp, beam_size=64)
    for (y, p), (y2, s) in zip(exact[:5], found[:5]):
        assert y == y2 and math.exp(s) == pytest.approx(p, rel=1e-6)
    pruned = ctc_prefix_beam_search(lp, beam_size=64, token_prune=2)
    assert len(pruned) <= len(found)


def test_ctc_prefix_scorer_gives_prefix_and_full_probabilities():
    torch.manual_seed(1)
    vocab, eos = 5, 1  # id 1 is the decoder's <sos/eos>: CTC never emits it
    lp = torch.randn(4, vocab).log_softmax(-1)
    probs = labelling_probs(lp)
    scorer = CTCPrefixScorer(lp, blank=0, eos=eos)
    r_n, r_b = scorer.initial_state()
    cands = torch.tensor([[2, 3, eos]])
    psi, new_n, new_b = scorer.extend(r_n, r_b, torch.tensor([-1]), torch.tensor([0]), cands)
    prefix = lambda h: sum(p for y, p in probs.items() if y[: len(h)] == h)  # noqa: E731
    assert math.exp(psi[0, 0]) == pytest.approx(prefix((2,)), rel=1e-5)
    assert math.exp(psi[0, 1]) == pytest.approx(prefix((3,)), rel=1e-5)
    assert math.exp(psi[0, 2]) == pytest.approx(probs[()], rel=1e-5)  # eos: the empty labelling
    # extend "2" by "2" (needs a blank in between) and score "2 2" as complete
    psi2, n2, b2 = scorer.extend(new_n[0, :1], new_b[0, :1], torch.tensor([2]), torch.tensor([1]),
                                 torch.tensor([[2, eos]]))
    assert math.exp(psi2[0, 0]) == pytest.approx(prefix((2, 2)), rel=1e-5)
    assert math.exp(psi2[0, 1]) == pytest.approx(probs[(2,)], rel=1e-5)
    assert math.exp(scorer.final(n2[0, :1], b2[0, :1])[0]) == pytest.approx(probs.get((2, 2), 0.0), rel=1e-5)


def uniform_attention(vocab):
    return lambda prefixes: torch.full((prefixes.shape[0], vocab), -math.log(vocab))


def test_joint_search_with_ctc_weight_one_finds_best_labelling():
    torch.manual_seed(2)
    vocab = 5
    lp = torch.randn(5, vocab)
    lp[:, 1] = -30.0  # the eos id is never a CTC label
    lp = lp.log_softmax(-1)
    best_y, best_p = max(labelling_probs(lp).items(), key=lambda kv: kv[1])
    ended = joint_beam_search(uniform_attention(vocab), lp, beam_size=8, ctc_weight=1.0)
    assert ended[0][0] == best_y and math.exp(ended[0][1]) == pytest.approx(best_p, rel=1e-5)
    # the classic lattice: joint decoding with CTC alone also recovers "a" where greedy returns nothing
    classic = torch.tensor([[0.6, 1e-9, 0.4], [0.6, 1e-9, 0.4]]).log()
    assert joint_beam_search(uniform_attention(3), classic, beam_size=3, ctc_weight=1.0)[0][0] == (2,)


def scripted_attention(sequence, vocab, eos=1):
    """An attention 'decoder' that is confident about one token sequence."""

    def next_lp(prefixes):
        out = torch.full((prefixes.shape[0], vocab), -10.0)
        for i, row in enumerate(prefixes.tolist()):
            k = len(row) - 1
            out[i, sequence[k] if k < len(sequence) else eos] = 0.0
        return out.log_softmax(-1)

    return next_lp


def test_joint_search_weights_attention_against_ctc():
    vocab = 6
    # CTC clearly says "2 3"; the attention decoder insists on "4 5 2"
    ctc = torch.full((6, vocab), -8.0)
    for t, lab in enumerate([2, 2, 0, 3, 3, 0]):
        ctc[t, lab] = 0.0
    ctc = ctc.log_softmax(-1)
    att = scripted_attention([4, 5, 2], vocab)
    assert joint_beam_search(att, ctc, beam_size=4, ctc_weight=0.0)[0][0] == (4, 5, 2)
    assert joint_beam_search(att, ctc, beam_size=4, ctc_weight=1.0)[0][0] == (2, 3)
    assert joint_beam_search(att, ctc, beam_size=4, ctc_weight=0.9)[0][0] == (2, 3)
    with pytest.raises(ConfigError, match="ctc_weight must be in"):
        joint_beam_search(att, ctc, ctc_weight=1.5)


def test_batch_decoders_on_a_tiny_model():
    from xmodal.students.lipreader import LipReader, tiny_lipreader_config

    torch.manual_seed(3)
    model = LipReader(tiny_lipreader_config(dim=32, num_layers=1)).eval()
    video = torch.rand(2, 5, 1, 16, 16)
    mask = lengths_to_mask(torch.tensor([5, 3]), 5)
    greedy = decode_batch(model, video, mask, "greedy")
    beam = decode_batch(model, video, mask, "beam", beam_size=3)
    joint = decode_batch(model, video, mask, "joint", beam_size=2, ctc_weight=0.5)
    for hyps in (greedy, beam, joint):
        assert len(hyps) == 2 and all(isinstance(t, int) and t >= 2 for h in hyps for t in h)
    assert len(joint[1]) <= 3  # a CTC prefix never outgrows the number of frames
    assert set(DECODERS.names()) == {"beam", "greedy", "joint"}
    with pytest.raises(ConfigError, match="unknown decoder 'gredy'"):
        decode_batch(model, video, mask, "gredy")

"""CER/WER on known strings, the shared text normalisation, and the lip-reading evaluator."""

import math

import pytest
import torch
from torch import nn

from xmodal.data.vocab import CharVocab
from xmodal.errors import DataError
from xmodal.seqalign import lengths_to_mask
from xmodal.tasks.lipread.evaluate import evaluate_lipreading
from xmodal.tasks.lipread.metrics import ErrorRates, cer, char_errors, normalize_text, wer, word_errors


def test_known_strings():
    assert cer("the cat sat", "the bat sat") == pytest.approx(1 / 11)
    assert wer("the cat sat", "the bat sat") == pytest.approx(1 / 3)
    assert char_errors("abc", "") == (3, 3)  # all deletions
    assert word_errors("bin blue at f two now", "bin blue f two now please") == (2, 6)  # deletion + insertion
    assert cer("kitten", "sitting") == pytest.approx(3 / 6)
    assert wer("a", "b c d") == pytest.approx(3.0)  # insertions can push WER above 1


def test_corpus_level_sums_edits_then_divides():
    refs, hyps = ["ab", "abcdefgh"], ["xb", "abcdefgh"]
    assert cer(refs, hyps) == pytest.approx(1 / 10)  # not the mean of per-utterance rates (0.25)
    rates = ErrorRates()
    rates.update(refs, hyps)
    s = rates.summary()
    assert (s["char_edits"], s["chars"], s["num_utterances"]) == (1, 10, 2)
    assert math.isnan(ErrorRates().cer)


def test_normalisation_is_the_vocabulary_one():
    assert normalize_text("  Hello,   World! It\u2019s  ") == "hello world it's" == CharVocab.normalize(
        "  Hello,   World! It\u2019s  ")
    assert cer("Hello, world!", "hello world") == 0.0
    assert wer("Well-known", "well known") == 0.0


class FixedCTC(nn.Module):
    """A 'recogniser' whose CTC logits spell given label paths, whatever the input."""

    def __init__(self, paths, vocab=30):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.paths, self.vocab, self.blank = paths, vocab, 0

    def forward(self, x, mask=None):
        b, t = x.shape[:2]
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            for j, lab in enumerate(self.paths[i][:t]):
                logits[i, j, lab] = 10.0
        mask = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
        return logits, mask, logits


def test_evaluate_lipreading_scores_and_skips_unlabeled():
    vocab = CharVocab()
    enc = lambda s: vocab.encode(s)  # noqa: E731
    # hypotheses (greedy): "ab", "a", "zz"
    paths = [[*enc("a"), 0, *enc("b")], [*enc("a"), 0, 0], [*enc("z"), 0, *enc("z")]]
    model = FixedCTC(paths)
    batch = {"video": torch.zeros(3, 3, 1, 4, 4), "video_mask": lengths_to_mask(torch.tensor([3, 3, 3]), 3),
             "transcripts": ["ab", "AB", ""], "ids": ["s0", "s1", "s2"]}
    out = evaluate_lipreading(model, [batch], vocab, "greedy")
    assert out["cer"] == pytest.approx(1 / 4) and out["wer"] == pytest.approx(1 / 2)
    assert out["num_utterances"] == 2 and out["skipped"] == 1
    assert out["examples"][1] == {"id": "s1", "ref": "ab", "hyp": "a"}
    beam = evaluate_lipreading(model, [batch], vocab, "beam", beam_size=4)
    assert beam["cer"] == pytest.approx(out["cer"])
    by_targets = {k: v for k, v in batch.items() if k != "transcripts"}
    by_targets["targets"] = torch.tensor([[*enc("ab")], [*enc("ab")], [-1, -1]])
    assert evaluate_lipreading(model, [by_targets], vocab)["cer"] == pytest.approx(1 / 4)
    with pytest.raises(DataError, match="reads batch\\['audio'\\]"):
        evaluate_lipreading(model, [batch], vocab, input_key="audio")


def test_evaluate_lipreading_without_references_is_an_error_not_nan():
    vocab = CharVocab()
    model = FixedCTC([[0, 0, 0]] * 2)
    batch = {"video": torch.zeros(2, 3, 1, 4, 4), "video_mask": lengths_to_mask(torch.tensor([3, 3]), 3),
             "transcripts": ["", " ... "], "ids": ["s0", "s1"]}
    with pytest.raises(DataError, match=r"no reference transcript to score in manifest m\.jsonl: 2 utterance"):
        evaluate_lipreading(model, [batch], vocab, source="manifest m.jsonl")
    with pytest.raises(DataError, match=r"the first 1 batches of the evaluation data"):
        evaluate_lipreading(model, [batch, batch], vocab, max_batches=1)
    from xmodal.tasks.lipread.evaluate import check_scores

    with pytest.raises(DataError, match="CER on x is not a number"):
        check_scores({"num_utterances": 1, "skipped": 0, "cer": math.nan, "wer": 0.5, "chars": 0, "words": 1}, "x")

"""Sentencepiece subword vocabulary: training, round trip, and its units through CTC, attention and beam search."""

import json
import math

import pytest
import torch

from xmodal.cli import main
from xmodal.data import vocab as vocabmod
from xmodal.data.av import AudioConfig, AVSpeechDataset
from xmodal.data.vocab import (
    CharVocab,
    SentencePieceVocab,
    load_vocab,
    relabel,
    train_sentencepiece,
    vocab_from_dict,
)
from xmodal.errors import ConfigError, DataError
from xmodal.features import Features
from xmodal.losses import LOSSES
from xmodal.nn.recognizer import AttentionDecoder
from xmodal.seqalign import decoder_io, lengths_to_mask
from xmodal.tasks.lipread.decode import ctc_prefix_beam_search, joint_beam_search

COLOURS, VERBS, PLACES = ("red", "green", "blue", "white"), ("place", "put", "set", "lay"), ("at", "by", "in", "with")
TEXTS = [f"{v} {c} {p} {chr(97 + (i % 26))} {n} {'please' if i % 3 else 'now'}"
         for i, (v, c, p, n) in enumerate((v, c, p, n) for v in VERBS for c in COLOURS for p in PLACES
                                          for n in ("one", "two", "three", "four"))]


@pytest.fixture(scope="module")
def sp():
    return train_sentencepiece(TEXTS, 40, source="texts")


def test_round_trip_and_records(sp, tmp_path):
    assert len(sp) == 42 and sp.tokens[:3] == ("<blank>", "<sos/eos>", "<unk>")
    for text in [*TEXTS[:20], "lay white with z three now", "reply please"]:  # also unseen word combinations
        ids = sp.encode(text)
        assert min(ids) >= 3 and sp.decode(ids) == text  # never blank, sos/eos or <unk>
    assert len(sp.encode("place green at b two please")) < len("place green at b two please")  # units, not chars
    assert sp.decode([0, 1, *sp.encode("put red"), -1, -1]) == "put red"
    assert vocab_from_dict(json.loads(json.dumps(sp.to_dict()))) == sp
    sp.save(tmp_path / "units.model")
    assert load_vocab(tmp_path / "units.model") == sp == load_vocab(str(tmp_path / "units.model"))
    assert load_vocab("ab ") == CharVocab("ab ") == vocab_from_dict({"chars": "ab "})  # records without a kind
    assert train_sentencepiece(reversed(TEXTS[::-1]), 40).model == sp.model  # same texts, same model


def test_bad_input_is_named(sp, tmp_path):
    with pytest.raises(DataError, match=r"sample 'utt-7': transcript 'put 7 red' has characters outside the "
                                        r"vocabulary: \['7'\]"):
        sp.encode("put 7 red", sample_id="utt-7")
    with pytest.raises(ConfigError, match=r"texts: sentencepiece training failed: .*Vocabulary size.*lower vocab_size"):
        train_sentencepiece(TEXTS, 5000, source="texts")
    with pytest.raises(DataError, match="no transcripts"):
        train_sentencepiece(["", "  !! "], 10, source="empty.jsonl")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"junk\.model is not a sentencepiece model"):
        load_vocab(junk)
    with pytest.raises(ConfigError, match="unknown vocabulary kind 'bpe-ish'"):
        vocab_from_dict({"kind": "bpe-ish"})


def test_missing_package_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_sentencepiece(name, *args, **kwargs):
        if name == "sentencepiece":
            raise ImportError("No module named 'sentencepiece'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    with pytest.raises(ConfigError, match=r"pip install 'xmodal\[speech\]'"):
        train_sentencepiece(TEXTS, 40)


def test_command_trains_from_a_manifest(tmp_path, capsys):
    manifest = tmp_path / "train.jsonl"
    rows = [{"id": f"u{i}", "video": f"v{i}.mp4", "transcript": t.upper()} for i, t in enumerate(TEXTS)]
    rows.append({"id": "unlabelled", "video": "x.mp4"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run" / "units.model"
    assert main(["data", "vocab", str(manifest), "--size", "40", "--out", str(out)]) == 0
    assert f"40 subword units (42 tokens with <blank> and <sos/eos>) from {len(TEXTS)} of {len(rows)} transcripts" \
        in capsys.readouterr().out
    assert SentencePieceVocab.load(out).model == train_sentencepiece(TEXTS, 40).model  # transcripts normalised
    assert main(["data", "vocab", str(manifest), "--out", str(tmp_path / "units.txt")]) == 2


def test_data_set_targets_are_subword_units(sp, tmp_path):
    import numpy as np
    from _media import write_wav

    write_wav(tmp_path / "a.wav", np.zeros(4000, np.float32))
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "video": "a.mp4", "audio": "a.wav",
                                                  "transcript": "Put RED by four, please!"}) + "\n")
    item = AVSpeechDataset(tmp_path / "m.jsonl", sp, video=None, audio=AudioConfig(n_mels=20))[0]
    assert item["targets"].tolist() == sp.encode("put red by four please")
    assert sp.decode(item["targets"].tolist()) == item["transcript"] == "put red by four please"


def test_teacher_labels_map_to_student_units(sp):
    chars = CharVocab()
    teacher_ids = chars.encode("set blue in q two now")
    assert relabel(teacher_ids, chars, sp) == sp.encode("set blue in q two now")
    assert chars.decode(relabel(sp.encode("lay green"), sp, chars)) == "lay green"


# ---------------------------------------------------------------------------------------------- decoding


def path_logits(ids, vocab_size, frames_per_token=3, blank=0, peak=8.0):
    """CTC logits [T, V] whose best path spells `ids` (each token then a blank)."""
    rows = []
    for i in ids:
        rows += [i] * (frames_per_token - 1) + [blank]
    logits = torch.zeros(len(rows), vocab_size)
    logits[torch.arange(len(rows)), torch.tensor(rows)] = peak
    return logits


def test_units_flow_through_ctc_loss_and_beam_search(sp):
    text = "place white with k four please"
    ids = sp.encode(text)
    good = path_logits(ids, len(sp))
    torch.manual_seed(0)
    noise = torch.randn_like(good, requires_grad=True)
    targets = torch.tensor([ids])
    ctc = LOSSES.build("ctc")

    def loss(logits):
        f = Features(pooled=logits.mean(1), tokens=logits, mask=torch.ones(logits.shape[:2], dtype=torch.bool),
                     logits=logits)
        return ctc({"video": f}, None, {"targets": targets}).loss

    bad = loss(noise[None])
    bad.backward()
    assert math.isfinite(bad.item()) and noise.grad.abs().sum() > 0
    assert loss(good[None]).item() < 0.1 * bad.item()
    best, _ = ctc_prefix_beam_search(good + 0.3 * torch.randn_like(good), beam_size=4)[0]
    assert sp.decode(best) == text


def test_units_flow_through_the_attention_decoder_and_joint_search(sp):
    torch.manual_seed(0)
    text = "lay blue by z one now"
    ids = sp.encode(text)
    targets, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    memory = torch.randn(1, 12, 32)
    mem_mask = lengths_to_mask(torch.tensor([12]), 12)
    dec = AttentionDecoder(len(sp), 32, num_heads=2, ffn_dim=64, dropout=0.0)
    inputs, _, _ = decoder_io(targets, sp.sos, sp.eos, lengths)
    ce = LOSSES.build("attention_ce", label_smoothing=0.0)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        logits, _ = dec(inputs, memory, mem_mask)
        f = Features(pooled=logits.mean(1), tokens=logits, logits=logits)
        out = ce({"video_context": f}, None, {"targets": targets, "target_lengths": lengths})
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.05 * first
    dec.eval()
    with torch.no_grad():
        hyps = joint_beam_search(lambda p: dec.next_log_probs(p, memory.expand(len(p), -1, -1),
                                                              mem_mask.expand(len(p), -1)),
                                 path_logits(ids, len(sp)), beam_size=3, ctc_weight=0.3, sos=sp.sos, eos=sp.eos)
    assert sp.decode(hyps[0][0]) == text


def test_vocab_kinds_come_from_a_registry():
    assert vocabmod.VOCABULARIES.get("sentencepiece") is SentencePieceVocab
    assert vocabmod.VOCABULARIES.get("chars") is CharVocab

"""Whisper teacher from a local transformers folder: a tiny random Whisper saved to a temp folder."""

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from _media import write_wav

from xmodal.cli import main
from xmodal.data.pseudo import ConfidenceFilter, pseudo_label_manifest
from xmodal.data.vocab import CharVocab
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.features import Features
from xmodal.models import create_teacher
from xmodal.seqalign import ALIGNERS, lengths_to_mask
from xmodal.teachers.whisper import Transcript, WhisperTeacher, load_whisper

SR, WINDOW_S, WIDTH = 16000, 2, 16
SPECIALS = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|nospeech|>", "<|notimestamps|>"]


def build_whisper(folder, say=None, steps=60):
    """A tiny random Whisper (2 s window, 16-wide) saved with its feature extractor and a byte-level tokenizer;
    with `say`, its decoder is first fitted to answer that text to any input."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    vocab = {s: i for i, s in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=WIDTH, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=WINDOW_S * 50, max_target_positions=32, pad_token_id=eot,
                        bos_token_id=eot, eos_token_id=eot,
                        decoder_start_token_id=tok.convert_tokens_to_ids("<|startoftranscript|>"))
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SR, hop_length=160, chunk_length=WINDOW_S, n_fft=400)
    if say is not None:
        prompt = [tok.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                         "<|notimestamps|>")]
        seq = torch.tensor([prompt + tok.encode(say, add_special_tokens=False) + [eot]])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            feats = torch.randn(2, 80, WINDOW_S * 100)
            logits = model(input_features=feats, decoder_input_ids=seq[:, :-1].expand(2, -1)).logits
            loss = torch.nn.functional.cross_entropy(logits[:, len(prompt) - 1:].reshape(-1, logits.shape[-1]),
                                                     seq[:, len(prompt):].expand(2, -1).reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    fe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def hi_dir(tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("whisper_hi"), say="hi there")


def noise(seconds, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 0.1, int(seconds * SR)).astype(np.float32))


def batch(*waves):
    n = max(w.numel() for w in waves)
    x = torch.zeros(len(waves), n)
    for i, w in enumerate(waves):
        x[i, : w.numel()] = w
    return x, lengths_to_mask(torch.tensor([w.numel() for w in waves]), n)


def test_encoder_states_at_50_hz_with_masks(whisper_dir):
    teacher = load_whisper(whisper_dir)
    assert isinstance(teacher, WhisperTeacher) and not teacher.training
    assert teacher.width == WIDTH and teacher.frame_rate == 50 and teacher.input_features == "waveform"
    assert not any(p.requires_grad for p in teacher.parameters())
    x, mask = batch(noise(1.0), noise(0.5, seed=1))
    out = teacher(x, mask)
    assert out.states.shape == (2, 50, WIDTH) and out.ctc_logits is None
    assert out.mask.sum(1).tolist() == [50, 25]
    assert out.states[1, 25:].abs().sum() == 0 and out.states[1, :25].abs().sum() > 0
    # a sample's states do not depend on the batch it is in
    alone = teacher(x[1:, : 8000], mask[1:, : 8000])
    assert torch.allclose(alone.states[0, :25], out.states[1, :25], atol=1e-5)


@pytest.mark.parametrize("aligner, params", [("rate_stack", {"ratio": 2}), ("time", {})])
def test_states_align_to_25_fps_video(whisper_dir, aligner, params):
    teacher = load_whisper(whisper_dir)
    x, mask = batch(noise(1.0), noise(0.5, seed=1))
    out = teacher(x, mask)
    t_feats = Features(pooled=out.states.mean(1), tokens=out.states, mask=out.mask)
    video_mask = lengths_to_mask(torch.tensor([25, 13]), 25)  # 1 s and 0.5 s of 25 fps video
    s_feats = Features(pooled=torch.zeros(2, WIDTH), tokens=torch.zeros(2, 25, WIDTH), mask=video_mask)
    aligned = ALIGNERS.build(aligner, **params).align(t_feats, s_feats, t_feats.tokens)
    assert aligned.values.shape == (2, 25, WIDTH) and torch.equal(aligned.mask, video_mask)
    assert torch.allclose(aligned.values[0, 3], out.states[0, 6:8].mean(0), atol=1e-5)
    assert aligned.values[1, 13:].abs().sum() == 0


def test_teacher_kind_whisper(whisper_dir):
    teacher = create_teacher({"kind": "whisper", "path": str(whisper_dir), "params": {"max_new_tokens": 5}},
                             family="speech")
    assert isinstance(teacher, WhisperTeacher) and teacher.max_new_tokens == 5
    assert teacher.fingerprint != load_whisper(whisper_dir, language=None).fingerprint
    with pytest.raises(ConfigError, match="unknown parameter 'langauge'"):
        create_teacher({"kind": "whisper", "path": str(whisper_dir), "params": {"langauge": "en"}}, family="speech")
    with pytest.raises(ConfigError, match=r"no <\|fr\|> token"):
        load_whisper(whisper_dir, language="fr")


def test_folder_problems_are_named(whisper_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*nothing is downloaded"):
        load_whisper(tmp_path / "nowhere")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(whisper_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no_weights has no weights \(looked for model\.safetensors"):
        load_whisper(no_weights)
    no_fe = tmp_path / "no_fe"
    shutil.copytree(whisper_dir, no_fe)
    (no_fe / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        load_whisper(no_fe)


def test_audio_longer_than_the_window_is_refused(whisper_dir):
    x, mask = batch(noise(0.5), noise(WINDOW_S + 0.5))
    with pytest.raises(DataError, match=r"utterance 1 of the batch is 2\.5 s, longer than Whisper's 2 s window"):
        load_whisper(whisper_dir)(x, mask)


def test_missing_transformers_names_the_extra(whisper_dir, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ConfigError, match=r"pip install 'xmodal\[speech\]'"):
        load_whisper(whisper_dir)


def test_transcribe_reports_text_and_confidence(hi_dir, whisper_dir):
    x, mask = batch(noise(1.0), noise(0.7, seed=3))
    said = load_whisper(hi_dir).transcribe(x, mask)
    assert [t.text for t in said] == ["hi there", "hi there"] and all(t.finished for t in said)
    assert all(-0.5 < t.avg_logprob <= 0 for t in said)
    rambling = load_whisper(whisper_dir, max_new_tokens=6).transcribe(x, mask)  # untrained: no end of text
    assert all(len(t.tokens) <= 6 and t.avg_logprob < said[0].avg_logprob for t in rambling)


# ---------------------------------------------------------------------------------------------- pseudo-labels


def test_filter_drops_and_counts():
    f = ConfidenceFilter(min_avg_logprob=-1.0, max_compression_ratio=2.4)
    vocab = CharVocab()
    cases = [
        (Transcript("Hello, world.", -0.2, [], True), None),
        (Transcript("hello world", -1.5, [], True), "low confidence"),
        (Transcript("hello world", -0.1, [], False), "unfinished"),
        (Transcript("room 101", -0.1, [], True), "outside vocabulary"),
        (Transcript("la " * 40, -0.1, [], True), "repetitive"),
        (Transcript(" ... ", -0.1, [], True), "empty"),
    ]
    for t, why in cases:
        assert f.reason(t, vocab) == why
        assert f.accept(t, vocab) == (why is None)
    assert f.counts["accepted"] == 1 and f.seen == 6 and f.acceptance_rate == pytest.approx(1 / 6)
    assert f.summary() == ("accepted 1/6 (16.7%); rejected: empty 1, low confidence 1, outside vocabulary 1, "
                           "repetitive 1, unfinished 1")
    assert ConfidenceFilter(min_avg_logprob=-2.0).accept(cases[1][0])


@pytest.fixture
def av_manifest(tmp_path):
    for name, seconds in (("a", 1.0), ("b", 0.6), ("c", 0.8)):
        write_wav(tmp_path / f"{name}.wav", noise(seconds, seed=len(name) + int(seconds * 10)).numpy())
    rows = [{"id": "a", "video": "a.mp4", "audio": "a.wav", "transcript": "known words", "speaker": "s1"},
            {"id": "b", "video": "b.mp4", "audio": "b.wav", "speaker": "s1"},
            {"id": "c", "video": "c.mp4", "audio": "c.wav", "transcript": ""},
            {"id": "d", "video": "d.mp4"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pseudo_labels_below_the_threshold_are_dropped_and_counted(hi_dir, av_manifest, caplog):
    teacher = load_whisper(hi_dir)
    out = av_manifest.parent / "pseudo.jsonl"
    with caplog.at_level(logging.INFO, logger="xmodal"):
        record = pseudo_label_manifest(av_manifest, out, teacher.transcribe, sample_rate=SR, teacher="tiny",
                                       filt=ConfidenceFilter(min_avg_logprob=-0.5), vocab=CharVocab())
    assert record["counts"] == {"accepted": 2, "no audio": 1} and record["acceptance_rate"] == pytest.approx(2 / 3)
    assert "accepted 2/3 (66.7%); rejected: no audio 1" in caplog.text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["transcript"] == "known words" and "pseudo_label" not in rows[0]
    assert [rows[1]["transcript"], rows[2]["transcript"]] == ["hi there", "hi there"]
    assert rows[1]["pseudo_label"]["teacher"] == "tiny" and -0.5 < rows[1]["pseudo_label"]["avg_logprob"] <= 0
    assert "transcript" not in rows[3]
    again = pseudo_label_manifest(av_manifest, out, teacher.transcribe, sample_rate=SR, teacher="tiny",
                                  filt=ConfidenceFilter(min_avg_logprob=-0.5), vocab=CharVocab())
    assert again["reused"] and again["counts"] == record["counts"]

    strict = pseudo_label_manifest(av_manifest, out, teacher.transcribe, sample_rate=SR, teacher="tiny",
                                   filt=ConfidenceFilter(min_avg_logprob=0.0), vocab=CharVocab())
    assert not strict["reused"] and strict["counts"] == {"low confidence": 2, "no audio": 1}
    assert strict["acceptance_rate"] == 0.0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "transcript" not in rows[1] and rows[2]["transcript"] == ""


def test_pseudo_label_command(hi_dir, av_manifest, capsys):
    out = av_manifest.parent / "cmd.jsonl"
    argv = ["data", "pseudo-label", str(av_manifest), "--teacher", str(hi_dir), "--out", str(out),
            "--min-avg-logprob", "-0.5", "--param", "language=en", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert "written; 3 of 4 clips asked: accepted 2/3 (66.7%)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    sidecar = json.loads((av_manifest.parent / "cmd.jsonl.json").read_text())
    assert sidecar["recipe"]["min_avg_logprob"] == -0.5 and math.isclose(sidecar["acceptance_rate"], 2 / 3)
    assert main(["data", "pseudo-label", str(av_manifest), "--teacher", str(hi_dir), "--out", str(av_manifest)]) == 2

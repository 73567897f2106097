"""xmodal speech recognisers as pseudo-labellers: greedy CTC transcripts with a confidence, fed the log-mel
features they were trained on, through `pseudo_label_manifest` and `xmodal data pseudo-label --kind speech`."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _media import write_wav

from xmodal.cli import main
from xmodal.config import to_dict
from xmodal.data.av import AudioConfig, _pad, fbank_features, load_audio
from xmodal.data.pseudo import pseudo_label_manifest
from xmodal.data.vocab import CharVocab
from xmodal.errors import ConfigError
from xmodal.models import create_teacher
from xmodal.nn.recognizer import ctc_confidence, save_recognizer
from xmodal.seqalign import ctc_greedy
from xmodal.teachers.speech import SpeechRecognizer, SpeechRecognizerConfig, load_speech_recognizer

N_MELS = 20
SR = 8000  # not the 16 kHz default, so a teacher fed the wrong rate would give other features
AUDIO = AudioConfig(sample_rate=SR, n_mels=N_MELS)


def tiny_recognizer() -> SpeechRecognizer:
    torch.manual_seed(0)
    model = SpeechRecognizer(SpeechRecognizerConfig(n_mels=N_MELS, dim=16, encoder="transformer", num_layers=1,
                                                    num_heads=2, ffn_dim=32, decoder_ffn_dim=32, conv_kernel=3,
                                                    dropout=0.0)).eval()
    with torch.no_grad():
        model.ctc_head.weight.mul_(8.0)  # sharp, varied posteriors: letters on most frames, blanks on some
        model.ctc_head.bias[1] = -50.0  # never <sos/eos>, which spells nothing
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A recogniser file with its vocabulary and audio settings (as the lip job saves it), and 4 clips at 8 kHz:
    one labelled, three unlabelled."""
    root = tmp_path_factory.mktemp("pseudo_speech")
    save_recognizer(tiny_recognizer(), root / "asr.pt", meta={"vocab": CharVocab().to_dict(), "audio": to_dict(AUDIO)})
    save_recognizer(tiny_recognizer(), root / "bare.pt")  # no meta: older files
    rng = np.random.default_rng(0)
    rows = []
    for i, seconds in enumerate((0.5, 0.7, 0.6, 0.4)):
        write_wav(root / f"u{i}.wav", rng.normal(0, 0.1, int(SR * seconds)).astype(np.float32), SR)
        rows.append({"id": f"u{i}", "video": f"u{i}.mp4", "audio": f"u{i}.wav", "speaker": "s1",
                     **({"transcript": "bin blue"} if i == 0 else {})})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def features(root, ids):
    return _pad([fbank_features(load_audio(root / f"{i}.wav", SR, i), AUDIO, i) for i in ids], ids, "audio")


def test_ctc_confidence_is_the_mean_over_emitting_frames():
    """Best path [_, a, a, _, b] + one padded frame: tokens [a, b]; confidence averages frames 1, 2 and 4 only."""
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.8, 0.1, 0.1], [0.3, 0.2, 0.5],
                          [0.0, 0.0, 1.0]])
    empty = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1]] + [[1.0, 0.0, 0.0]] * 4)
    logits = torch.stack([probs, empty]).clamp_min(1e-9).log()
    mask = torch.tensor([[True] * 5 + [False], [True] * 2 + [False] * 4])
    tokens, conf = ctc_confidence(logits, mask, blank=0)
    assert tokens == [[1, 2], []]
    assert conf[0].item() == pytest.approx((math.log(0.7) + math.log(0.6) + math.log(0.5)) / 3, abs=1e-6)
    # no emitting frame: the mean over the real frames (the padded ones are left out)
    assert conf[1].item() == pytest.approx((math.log(0.9) + math.log(0.6)) / 2, abs=1e-6)
    # the same utterance with more padding scores the same
    tokens2, conf2 = ctc_confidence(torch.cat([logits, logits[:, :1]], 1), torch.cat([mask, mask[:, :1] & False], 1))
    assert tokens2 == tokens and torch.allclose(conf2, conf)


def test_transcribe_is_the_greedy_ctc_decode_of_its_logits(corpus):
    teacher = create_teacher({"kind": "speech", "path": str(corpus / "asr.pt")}, family="speech")
    assert (teacher.sample_rate, teacher.audio_config, teacher.vocab) == (SR, AUDIO, CharVocab())
    x, mask = features(corpus, ["u1", "u2", "u3"])
    got = teacher.transcribe(x, mask)
    out = teacher(x, mask)
    vocab = CharVocab()
    want = [vocab.decode(ids) for ids in ctc_greedy(out.ctc_logits, out.mask)]
    assert [t.text for t in got] == want and all(want) and len(set(want)) == 3
    for i, t in enumerate(got):  # avg_logprob by hand: log-prob of the argmax, averaged over non-blank frames
        lp = torch.log_softmax(out.ctc_logits[i, : int(out.mask[i].sum())], -1)
        best, labels = lp.max(-1)
        assert 0 < int((labels == 0).sum()) < len(labels)  # both kinds of frame are there, so the choice matters
        assert t.avg_logprob == pytest.approx(best[labels != 0].mean().item(), abs=1e-5)
        assert t.avg_logprob != pytest.approx(best.mean().item(), abs=1e-3)
        assert t.finished and t.compression_ratio > 0
    alone = teacher.transcribe(*features(corpus, ["u2"]))[0]  # padding does not change a clip's transcript
    assert alone.text == got[1].text and alone.avg_logprob == pytest.approx(got[1].avg_logprob, abs=1e-5)


def test_a_file_without_meta_needs_a_vocabulary_and_a_rate(corpus, tmp_path, capsys):
    bare = load_speech_recognizer(corpus / "bare.pt")
    assert bare.sample_rate is None and bare.audio_config is None
    with pytest.raises(ConfigError, match="does not know its vocabulary"):
        bare.transcribe(*features(corpus, ["u1"]))
    with pytest.raises(ConfigError, match="predicts 30 tokens but the vocabulary has 5"):
        load_speech_recognizer(corpus / "bare.pt", vocab=CharVocab("abc"))
    assert load_speech_recognizer(corpus / "bare.pt", vocab=CharVocab()).transcribe(*features(corpus, ["u1"]))
    argv = ["data", "pseudo-label", str(corpus / "train.jsonl"), "--kind", "speech", "--teacher",
            str(corpus / "bare.pt"), "--out", str(tmp_path / "pl.jsonl"), "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    assert "does not say its sample rate; pass --sample-rate" in capsys.readouterr().err
    assert main(argv + ["--sample-rate", str(SR)]) == 0  # the command's vocabulary decodes it
    assert "3 of 4 clips asked" in capsys.readouterr().out
    # a file that records its rate refuses another one
    assert main([*argv[:6], str(corpus / "asr.pt"), *argv[7:], "--sample-rate", "16000"]) == 2
    assert "trained on fbank features of 8000 Hz audio" in capsys.readouterr().err


def test_pseudo_label_counts_follow_the_threshold(corpus, tmp_path, capsys):
    """Through the command (what a user runs) at two thresholds between the clips' confidences, checked
    against `transcribe` on the same features."""
    teacher = load_speech_recognizer(corpus / "asr.pt")
    unlabelled = ["u1", "u2", "u3"]
    direct = dict(zip(unlabelled, teacher.transcribe(*features(corpus, unlabelled))))
    conf = sorted(t.avg_logprob for t in direct.values())
    assert conf[0] < conf[1] < conf[2]
    out = tmp_path / "pl.jsonl"
    base = ["data", "pseudo-label", str(corpus / "train.jsonl"), "--kind", "speech", "--teacher",
            str(corpus / "asr.pt"), "--out", str(out), "--max-compression-ratio", "100", "--batch-size", "2",
            "--no-progress", "--device", "cpu"]
    for threshold, accepted in (((conf[0] + conf[1]) / 2, 2), ((conf[1] + conf[2]) / 2, 1)):
        assert main([*base, "--min-avg-logprob", str(threshold)]) == 0
        assert f"3 of 4 clips asked: accepted {accepted}/3" in capsys.readouterr().out
        sidecar = json.loads(out.with_name(out.name + ".json").read_text())
        assert sidecar["counts"] == {"accepted": accepted, "low confidence": 3 - accepted}
        assert sidecar["recipe"]["audio"]["features"] == "fbank" and sidecar["recipe"]["sample_rate"] == SR
        rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert rows["u0"]["transcript"] == "bin blue" and "pseudo_label" not in rows["u0"]
        for i, t in direct.items():
            if t.avg_logprob >= threshold:
                assert rows[i]["transcript"] == CharVocab.normalize(t.text)
                assert rows[i]["pseudo_label"]["avg_logprob"] == pytest.approx(t.avg_logprob, abs=1e-3)
            else:
                assert "transcript" not in rows[i]


def test_pseudo_label_manifest_feeds_waveform_or_features(corpus, tmp_path):
    """The transcriber gets [B, S] waveforms by default, [B, T, n_mels] log-mels with an fbank AudioConfig."""
    seen = []

    class Probe:
        def __init__(self, text):
            self.text, self.avg_logprob, self.finished, self.compression_ratio = text, 0.0, True, 1.0

    def transcribe(x, mask):
        seen.append((tuple(x.shape), mask.sum(1).tolist()))
        return [Probe("a") for _ in range(len(x))]

    manifest = corpus / "train.jsonl"
    pseudo_label_manifest(manifest, tmp_path / "w.jsonl", transcribe, sample_rate=SR, teacher="probe", batch_size=4)
    pseudo_label_manifest(manifest, tmp_path / "f.jsonl", transcribe, audio=AUDIO, teacher="probe", batch_size=4)
    assert seen[0] == ((3, int(SR * 0.7)), [int(SR * s) for s in (0.7, 0.6, 0.4)])
    frames = [fbank_features(load_audio(corpus / f"u{i}.wav", SR), AUDIO).shape[0] for i in (1, 2, 3)]
    assert seen[1] == ((3, max(frames), N_MELS), frames)
    with pytest.raises(ConfigError, match="sample_rate 16000 differs from audio.sample_rate 8000"):
        pseudo_label_manifest(manifest, tmp_path / "x.jsonl", transcribe, sample_rate=16000, audio=AUDIO,
                              teacher="probe")


@pytest.fixture
def bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return pytest.importorskip("bench_lipread")


def test_bench_pseudo_label_variant_trains_like_distill20(bench):
    kw = dict(levels=(1.0, 0.0, 0.0), aligner="time", distance="cosine", full_kl_weight=1.0,
              context_aligner="attention")
    assert bench.variant_losses("pseudo20", 0.1, 1.0, **kw) == bench.variant_losses("distill20", 0.1, 1.0, **kw)
    assert "pseudo20" in bench.PARTIAL_LABELS and "pseudo20" in bench.DISTILLED


def test_bench_threshold_keeps_the_most_labels_at_the_wanted_quality(bench):
    errors = bench.label_errors(["bin blue", "set red", "lay green", "place"], ["bin blue", "set rad", "lay grn",
                                                                                 "place"])
    assert errors == [(0, 8), (1, 7), (2, 9), (0, 5)]
    conf = [-0.01, -0.2, -0.5, -0.05]
    assert bench.pooled_cer(errors) == pytest.approx(3 / 29)
    assert bench.choose_threshold(conf, errors, 0.0) == -0.05  # the two exact ones
    assert bench.choose_threshold(conf, errors, 0.05) == -0.2  # + "set rad": 1 / 20
    assert bench.choose_threshold(conf, errors, 0.2) == -0.5  # all
    assert bench.choose_threshold([-0.3, -0.1], [(1, 4), (2, 4)], 0.0) == -0.1  # none qualifies: the surest
    assert bench.confidence_auroc(conf, errors) == 1.0
    assert bench.confidence_auroc([-0.3, -0.1, -0.2], [(0, 4), (1, 4), (0, 4)]) == 0.0
    assert bench.confidence_auroc([-0.3], [(0, 4)]) is None
    record, seen = bench.recording(lambda x, mask: [f"t{i}" for i in range(len(x))])
    record(torch.zeros(2, 3), None), record(torch.zeros(1, 3), None)
    assert seen == ["t0", "t1", "t0"]


def test_wav2vec2_with_labels_transcribes_into_the_vocabulary(tmp_path):
    from test_speech_models import W2V_CFG, tiny_wav2vec2

    from xmodal.teachers.speech import save_wav2vec2

    model = tiny_wav2vec2()
    with torch.no_grad():
        model.aux.weight.mul_(20.0)
    save_wav2vec2(model, tmp_path / "w2v.pt", W2V_CFG, labels=["-", "|", "E", "T", "A", "'"])
    vocab = CharVocab()
    spec = {"kind": "wav2vec2", "path": str(tmp_path / "w2v.pt")}
    enc = create_teacher(spec, family="speech", vocab=vocab)
    torch.manual_seed(0)
    wave = torch.randn(2, 4000)
    mask = torch.ones_like(wave, dtype=torch.bool)
    mask[1, 2500:] = False
    got = enc.transcribe(wave, mask)
    out = enc(wave, mask)
    assert [t.text for t in got] == [vocab.decode(ids) for ids in ctc_greedy(out.ctc_logits, out.mask)]
    assert any(t.text for t in got) and set("".join(t.text for t in got)) <= set("et a'")
    tokens, conf = ctc_confidence(out.ctc_logits, out.mask)
    assert [t.avg_logprob for t in got] == pytest.approx(conf.tolist())
    with pytest.raises(ConfigError, match="needs a CTC head and teacher.params.labels"):
        create_teacher(spec, family="speech").transcribe(wave, mask)  # no vocabulary to map into

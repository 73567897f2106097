"""Pseudo-label transcripts kept in the teacher cache: the teacher runs once per clip, any filter reads the cache,
an interrupted run resumes, and another teacher or changed data is refused, naming the folder and what differs."""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _media import write_wav

from xmodal.cli import main
from xmodal.data.av import AudioConfig
from xmodal.data.pseudo import (
    TRANSCRIPT,
    ConfidenceFilter,
    cached_transcripts,
    pseudo_label_manifest,
    transcript_features,
    transcripts_from_features,
)
from xmodal.data.vocab import CharVocab
from xmodal.engine.cache import TeacherCache
from xmodal.errors import CheckpointError
from xmodal.nn.recognizer import compression_ratio

SR = 8000
AUDIO = AudioConfig(sample_rate=SR, features="waveform")
# unlabelled clips u1..u5 by length in samples; the fake teacher knows a clip by its length
SAID = {800: ("bin blue", -0.1), 1200: ("set red now", -0.4), 1600: ("lay green", -0.8), 2000: ("café 101", -0.2),
        2400: ("la " * 40, -0.05)}


@dataclass
class Said:
    text: str
    avg_logprob: float
    finished: bool = True

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)


class Teacher:
    """Transcribes by clip length; records the lengths it was asked; raises on call number `crash_at`."""

    def __init__(self, crash_at: int | None = None):
        self.calls, self.lengths, self.crash_at = 0, [], crash_at

    def __call__(self, x, mask):
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise RuntimeError("teacher crashed")
        lengths = mask.sum(1).tolist()
        self.lengths.extend(lengths)
        return [Said(*SAID.get(n, ("bin blue", -0.3))) for n in lengths]  # 1000: the labelled u0


def refuse(x, mask):
    raise AssertionError("the teacher was called, but its transcripts are in the cache")


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"id": "u0", "video": "u0.mp4", "audio": "u0.wav", "transcript": "bin blue"}]
    write_wav(tmp_path / "u0.wav", rng.normal(0, 0.1, 1000), SR)
    for i, n in enumerate(SAID, start=1):
        write_wav(tmp_path / f"u{i}.wav", rng.normal(0, 0.1, n), SR)
        rows.append({"id": f"u{i}", "video": f"u{i}.mp4", "audio": f"u{i}.wav"})
    rows.append({"id": "v", "video": "v.mp4"})  # no audio: never reaches the teacher
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def label(data, transcribe, out="pl.jsonl", **kw):
    kw = {"audio": AUDIO, "teacher": "fake-teacher", "batch_size": 2, "shard_size": 2, **kw}
    return pseudo_label_manifest(data / "train.jsonl", data / out, transcribe, **kw)


def rows(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_transcripts_survive_the_cache_fields_exactly():
    said = [Said("héllo wörld ✓", -0.25), Said("", -math.inf, False), Said("abc", float("nan")),
            Said("la " * 40, -0.05)]
    f = transcript_features(said)
    assert f.tokens.shape == (4, 120, 1) and f.pooled.shape == (4, 3)
    assert f.mask.sum(1).tolist() == [len("héllo wörld ✓".encode()), 0, 3, 120]
    back = transcripts_from_features(f)
    assert [t.text for t in back] == [t.text for t in said]
    assert [t.finished for t in back] == [True, False, True, True]
    assert back[0].avg_logprob == -0.25 and back[1].avg_logprob == back[2].avg_logprob == np.finfo(np.float32).min
    assert [t.compression_ratio for t in back] == [t.compression_ratio for t in said]  # exact, not float32-rounded

    class Custom(Said):  # a teacher with its own repetition measure: the stored value is used
        compression_ratio = 5.0

    assert transcripts_from_features(transcript_features([Custom("abc", 0.0)]))[0].compression_ratio == 5.0
    # an empty batch of texts (no bytes at all) is still a valid row set
    assert [t.text for t in transcripts_from_features(transcript_features([Said("", -1.0)]))] == [""]


def test_a_ratio_at_the_threshold_filters_as_from_the_teacher(data):
    """A text whose ratio rounds up in float32 is accepted at max_compression_ratio == its ratio, as without a
    cache (a float32 copy of the ratio would exceed the threshold and be rejected)."""
    text = next(t for t in (f"{'ab ' * k}cd" for k in range(5, 60))
                if float(np.float32(compression_ratio(t))) > compression_ratio(t))
    ratio = compression_ratio(text)
    stored = transcripts_from_features(transcript_features([Said(text, -0.1)]))[0]
    filt = ConfidenceFilter(min_avg_logprob=-1.0, max_compression_ratio=ratio)
    assert filt.reason(Said(text, -0.1)) is None and filt.reason(stored) is None


def test_changing_the_filter_reads_the_cache_not_the_teacher(data):
    teacher = Teacher()
    first = label(data, teacher, filt=ConfidenceFilter(min_avg_logprob=-1.0, max_compression_ratio=None))
    assert sorted(teacher.lengths) == sorted(SAID) and first["transcribed"] == 5
    assert first["counts"] == {"accepted": 5, "no audio": 1}
    assert first["cache"] == str(data / "pl.jsonl.cache") and first["recipe"]["fingerprint"].startswith("fake-teacher")
    out = data / "pl.jsonl"
    assert rows(out)["u2"]["transcript"] == "set red now" and rows(out)["u0"]["transcript"] == "bin blue"

    # another threshold, ratio limit and vocabulary: filtered from the cache, the teacher never runs
    second = label(data, refuse, filt=ConfidenceFilter(min_avg_logprob=-0.5, max_compression_ratio=2.4),
                   vocab=CharVocab())
    assert not second["reused"] and second["transcribed"] == 0
    assert second["counts"] == {"accepted": 2, "low confidence": 1, "outside vocabulary": 1, "repetitive": 1,
                                "no audio": 1}
    got = rows(out)
    assert {i for i, r in got.items() if "pseudo_label" in r} == {"u1", "u2"}
    assert got["u2"]["pseudo_label"] == {"teacher": "fake-teacher", "avg_logprob": -0.4}
    assert "transcript" not in got["u3"] and "transcript" not in got["u4"]
    sidecar = json.loads((data / "pl.jsonl.json").read_text())
    assert sidecar["recipe"]["min_avg_logprob"] == -0.5 and sidecar["cache"] == str(data / "pl.jsonl.cache")
    # the same recipe again: the sidecar says the manifest is up to date
    assert label(data, refuse, filt=ConfidenceFilter(min_avg_logprob=-0.5, max_compression_ratio=2.4),
                 vocab=CharVocab())["reused"]

    # the cache is an ordinary teacher cache, keyed by clip id
    cache = TeacherCache(data / "pl.jsonl.cache")
    assert cache.modalities == [TRANSCRIPT] and len(cache) == 5 and "u0" not in cache
    assert cache.manifest["fields"][f"{TRANSCRIPT}.tokens"]["dtype"] == "float32"
    stored = cached_transcripts(data / "pl.jsonl.cache", ["u5", "u4", "u2"])
    assert stored["u5"].text == "la " * 40 and stored["u4"].text == "café 101"
    assert stored["u2"].avg_logprob == pytest.approx(-0.4) and stored["u2"].finished


def test_an_interrupted_run_resumes_and_writes_nothing_half_done(data):
    whole = Teacher()
    label(data, whole, out="whole.jsonl")
    old = label(data, Teacher(), out="pl.jsonl")  # an earlier run's labels, kept while the next one fails
    before = {p: (data / p).read_bytes() for p in ("pl.jsonl", "pl.jsonl.json")}

    crashing = Teacher(crash_at=3)  # batches of 2 in shards of 2: u0-u3 done, shard 2 (u4, u5) fails
    with pytest.raises(RuntimeError, match="teacher crashed"):
        label(data, crashing, relabel=True, cache=data / "relabel.cache")
    assert {p: (data / p).read_bytes() for p in before} == before
    manifest = json.loads((data / "relabel.cache" / "manifest.json").read_text())
    assert not manifest["complete"] and [e["name"] for e in manifest["shards"]] == ["shard_00000", "shard_00001"]

    resumed = Teacher()
    record = label(data, resumed, relabel=True, cache=data / "relabel.cache")
    assert resumed.lengths == [2000, 2400]  # only the missing shard: u4 and u5
    assert record["transcribed"] == 2 and record["asked"] == 7
    assert record["counts"] == {"accepted": 5, "repetitive": 1, "no audio": 1}
    got, want = rows(data / "pl.jsonl"), rows(data / "whole.jsonl")
    assert all(got[i]["transcript"] == want[i]["transcript"] for i in ("u1", "u2", "u3", "u4"))
    assert "transcript" not in got["u5"] and "transcript" not in want["u5"]
    assert got["u0"]["pseudo_label"]["teacher"] == "fake-teacher" and old["recipe"]["relabel"] is False


def test_another_teacher_or_changed_data_is_refused(data):
    label(data, Teacher())
    cache = data / "pl.jsonl.cache"
    with pytest.raises(CheckpointError, match=rf"{cache}.*the teacher differs.*--cache.*delete {cache}"):
        label(data, refuse, teacher="other-teacher")
    with pytest.raises(CheckpointError, match=r"the data differ: clips"):  # relabel asks for one more clip
        label(data, refuse, relabel=True)

    write_wav(data / "u3.wav", np.zeros(1600), SR)  # same length, other content
    os.utime(data / "u3.wav", ns=(1, 1))
    with pytest.raises(CheckpointError, match=rf"{cache}.*the data differ: media"):
        label(data, refuse)

    manifest = data / "train.jsonl"
    manifest.write_text(manifest.read_text().replace('"bin blue"', '"bin blue now"'))
    with pytest.raises(CheckpointError, match=r"the data differ: manifest, media"):
        label(data, refuse)
    # another cache folder starts afresh for the new data
    assert label(data, Teacher(), cache=data / "fresh")["transcribed"] == 5


def test_nothing_to_ask_needs_no_cache(data):
    manifest = data / "train.jsonl"
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({**r, "transcript": "known"}) + "\n" for r in lines if "audio" in r))
    record = label(data, refuse)
    assert record["cache"] is None and record["asked"] == 0 and not (data / "pl.jsonl.cache").exists()


def test_command_uses_the_cache_beside_out_or_the_one_given(data, capsys, monkeypatch):
    from test_pseudo_speech import tiny_recognizer

    from xmodal.config import to_dict
    from xmodal.nn.recognizer import save_recognizer
    from xmodal.teachers.speech import SpeechRecognizer

    audio = AudioConfig(sample_rate=SR, n_mels=20)
    save_recognizer(tiny_recognizer(), data / "asr.pt", meta={"vocab": CharVocab().to_dict(), "audio": to_dict(audio)})
    out = data / "cmd.jsonl"
    argv = ["data", "pseudo-label", str(data / "train.jsonl"), "--kind", "speech", "--teacher", str(data / "asr.pt"),
            "--out", str(out), "--no-progress", "--device", "cpu", "--max-compression-ratio", "100"]
    assert main([*argv, "--min-avg-logprob", "-100"]) == 0
    said = capsys.readouterr().out
    assert "6 of 7 clips asked: accepted 5/6" in said and f"transcripts in {out}.cache (5 new)" in said

    monkeypatch.setattr(SpeechRecognizer, "transcribe", lambda self, x, mask=None: refuse(x, mask))
    assert main([*argv, "--min-avg-logprob", "0"]) == 0
    said = capsys.readouterr().out
    assert "accepted 0/6" in said and "(0 new)" in said
    with pytest.raises(AssertionError, match="the teacher was called"):  # a new cache folder needs the teacher
        main([*argv, "--cache", str(data / "elsewhere")])

    other = tiny_recognizer()
    with torch.no_grad():
        other.ctc_head.bias[2] += 1.0
    save_recognizer(other, data / "asr.pt", meta={"vocab": CharVocab().to_dict(), "audio": to_dict(audio)})
    assert main([*argv, "--min-avg-logprob", "-1"]) == 2
    err = capsys.readouterr().err
    assert f"{out}.cache holds a teacher cache that does not fit this one: the teacher differs" in err

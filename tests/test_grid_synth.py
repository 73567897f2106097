import json
import wave

import numpy as np
import pytest

from xmodal.data import espeak
from xmodal.data.grid import (
    GRID_GRAMMAR,
    make_speakers,
    plan_corpus,
    sample_sentence,
    sentence_code,
    split_speakers,
    spoken_text,
    synthesize_grid,
)
from xmodal.data.visemes import (
    PHONEME_VISEMES,
    VISEMES,
    Appearance,
    mouth_track,
    phoneme_visemes,
    render_mouth,
)
from xmodal.errors import ConfigError, DataError

SPEAKERS, UTTERANCES, ROI = 3, 2, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid_a")
    info = synthesize_grid(out, speakers=SPEAKERS, utterances=UTTERANCES, seed=3, roi_size=ROI, progress=False)
    return out, info


@pytest.fixture(scope="module")
def corpus_again(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid_b")
    synthesize_grid(out, speakers=SPEAKERS, utterances=UTTERANCES, seed=3, roi_size=ROI, progress=False)
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _all_records(root):
    return [r for split in ("train", "val", "test") for r in _lines(root / f"{split}.jsonl")]


def _decode_pyav(path):
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])


# ---------------------------------------------------------------------------------------------- eSpeak


def test_espeak_is_deterministic_whatever_was_spoken_before():
    a = espeak.synthesize("bin blue at f two now", voice="en+m3", seed=1)
    espeak.synthesize("place green with q nine soon", voice="en-us+f2", rate=200, seed=5)
    b = espeak.synthesize("bin blue at f two now", voice="en+m3", seed=1)
    assert a.sample_rate == espeak.sample_rate() == 22050
    assert a.samples.dtype == np.int16 and len(a.samples) > 0.5 * a.sample_rate
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.phonemes == b.phonemes


def test_espeak_phoneme_timings_are_monotone_and_inside_the_audio():
    s = espeak.synthesize("lay red by m seven again", voice="en+f3", rate=180, pitch=60, seed=2)
    names = [p.phoneme for p in s.phonemes]
    assert {"l", "r", "b", "m", "s"} <= set(names)
    assert all("'" not in n for n in names) and any(p.stress == 2 for p in s.phonemes)
    starts = [p.start for p in s.phonemes]
    assert starts == sorted(starts)
    for p in s.phonemes:
        assert 0.0 <= p.start <= p.end <= s.duration + 1e-9
    assert len(s.words) == 6


def test_espeak_rate_changes_duration_and_bad_parameters_fail():
    slow = espeak.synthesize("set white in x zero please", rate=120)
    fast = espeak.synthesize("set white in x zero please", rate=300)
    assert fast.duration < 0.75 * slow.duration
    with pytest.raises(ConfigError, match="voice"):
        espeak.synthesize("hello", voice="no-such-voice+zz")
    with pytest.raises(ConfigError, match="rate"):
        espeak.synthesize("hello", rate=10)
    with pytest.raises(ConfigError, match="pitch"):
        espeak.synthesize("hello", pitch=101)


# ---------------------------------------------------------------------------------------------- visemes


def test_bilabials_share_a_viseme_and_every_mapping_is_known():
    assert phoneme_visemes("p") == phoneme_visemes("b") == phoneme_visemes("m") == ("PBM",)
    assert phoneme_visemes("'u:") == ("WU",) and phoneme_visemes("i:") == ("IY",)
    assert phoneme_visemes("_:") == ("sil",)
    assert phoneme_visemes("aI") == ("AA", "IY")  # diphthongs move
    assert phoneme_visemes("Q#") in {(v,) for v in VISEMES}  # unknown mnemonics fall back to a viseme
    for vis in PHONEME_VISEMES.values():
        assert all(v in VISEMES for v in vis)
    # lips are more ambiguous than audio: far fewer visemes than phonemes
    assert len(VISEMES) < len(PHONEME_VISEMES) / 4


STILL = Appearance(noise=0.0, jitter=0.0)


def _frames_for(phoneme):
    track = mouth_track([("_", 0.0, 0.2), (phoneme, 0.2, 0.6), ("_", 0.6, 0.8)], 0.8)
    return track, render_mouth(track, STILL, size=48)


def test_oo_and_ee_frames_differ_but_p_b_m_frames_match():
    (t_oo, f_oo), (t_ee, f_ee) = _frames_for("u:"), _frames_for("i:")
    mid = 10  # frame centred at 0.42 s, inside the phoneme
    assert t_oo[mid, 2] > 0.8 > 0.2 > t_ee[mid, 2]  # rounding
    assert t_ee[mid, 1] > t_oo[mid, 1] + 0.4  # width
    assert np.abs(f_oo[mid].astype(int) - f_ee[mid]).mean() > 3.0
    dark_oo = (f_oo[mid] < 60).any(0).sum()  # horizontal extent of the open mouth
    dark_ee = (f_ee[mid] < 60).any(0).sum()
    assert dark_ee > dark_oo
    frames = [_frames_for(p)[1] for p in ("p", "b", "m")]
    np.testing.assert_array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(frames[0], frames[2])


def test_bilabial_closes_the_lips_between_open_vowels():
    track = mouth_track([("a", 0.0, 0.3), ("m", 0.3, 0.42), ("a", 0.42, 0.8)], 0.8)
    opening = track[:, 0]
    assert opening[3] > 0.6 and opening[17] > 0.6
    assert opening[9] < 0.15  # the frame centred at 0.36 s, inside the /m/


# ---------------------------------------------------------------------------------------------- grammar


def test_grid_grammar_sentences_and_codes():
    rng = np.random.default_rng(0)
    assert "w" not in GRID_GRAMMAR["letter"] and len(GRID_GRAMMAR["letter"]) == 25
    for _ in range(50):
        words = sample_sentence(rng)
        assert len(words) == 6
        for w, options in zip(words, GRID_GRAMMAR.values()):
            assert w in options
    assert sentence_code(("bin", "blue", "at", "f", "two", "now")) == "bbaf2n"
    # the letter is spoken by name: "a" as in "ay", not the article
    spoken = espeak.synthesize(spoken_text(("set", "red", "at", "a", "one", "now")))
    assert [p.phoneme for p in spoken.phonemes][6:9] == ["a", "t", "eI"]


def test_speakers_and_splits_are_seeded_and_speaker_disjoint():
    assert make_speakers(5, seed=1) == make_speakers(5, seed=1)
    assert make_speakers(5, seed=1) != make_speakers(5, seed=2)
    split = split_speakers([f"s{i:02d}" for i in range(20)], seed=0)
    assert sorted(split.values()).count("val") == 2 and sorted(split.values()).count("test") == 2
    assert set(split_speakers(["a", "b", "c"]).values()) == {"train", "val", "test"}
    with pytest.raises(ConfigError, match="at least 3 speakers"):
        split_speakers(["a", "b"])
    plan = plan_corpus(3, 4, seed=0)
    assert len(plan) == 12 and len({u.id for u in plan}) == 12
    assert plan == plan_corpus(3, 4, seed=0) and plan != plan_corpus(3, 4, seed=1)


# ---------------------------------------------------------------------------------------------- corpus


def test_corpus_layout_manifests_and_description(corpus):
    out, info = corpus
    assert info["name"] == "synthetic-grid" and info["synthetic"] is True
    assert "synthetic" in info["description"].lower()
    assert json.loads((out / "corpus.json").read_text()) == info
    assert info["request"]["seed"] == 3 and len(info["speakers"]) == SPEAKERS
    assert sum(info["counts"].values()) == SPEAKERS * UTTERANCES
    assert not (out / ".synth-request.json").exists()
    speakers_by_split = {}
    for split in ("train", "val", "test"):
        rows = _lines(out / f"{split}.jsonl")
        assert rows, split
        assert len(rows) == info["counts"][split]
        speakers_by_split[split] = {r["speaker"] for r in rows}
        for r in rows:
            assert set(r) == {"id", "video", "audio", "transcript", "speaker"}
            assert not r["video"].startswith("/") and (out / r["video"]).is_file()
            assert (out / r["audio"]).is_file()
            assert len(r["transcript"].split()) == 6
    assert not speakers_by_split["train"] & speakers_by_split["val"]
    assert not speakers_by_split["train"] & speakers_by_split["test"]
    assert not speakers_by_split["val"] & speakers_by_split["test"]
    assert 0.2 < info["video_stats"]["mean"] < 0.8 and info["video_stats"]["std"] > 0.02


def test_same_seed_gives_identical_transcripts_audio_and_frames(corpus, corpus_again):
    out_a, _ = corpus
    rows_a, rows_b = _all_records(out_a), _all_records(corpus_again)
    assert [(r["id"], r["transcript"]) for r in rows_a] == [(r["id"], r["transcript"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert (out_a / ra["audio"]).read_bytes() == (corpus_again / rb["audio"]).read_bytes()
        np.testing.assert_array_equal(_decode_pyav(out_a / ra["video"]), _decode_pyav(corpus_again / rb["video"]))


def test_video_readable_by_decord_and_pyav_with_the_right_frame_count(corpus):
    import decord

    out, info = corpus
    for r in _all_records(out)[:3]:
        with wave.open(str(out / r["audio"])) as w:
            assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
            duration = w.getnframes() / w.getframerate()
        frames = _decode_pyav(out / r["video"])
        vr = decord.VideoReader(str(out / r["video"]))
        assert len(vr) == len(frames) == round(duration * 25)
        assert frames.shape[1:] == (ROI, ROI)
        assert abs(vr.get_avg_fps() - 25) < 1e-6
        assert 1.0 < duration < 4.0
        gray = vr.get_batch(list(range(len(vr)))).asnumpy().mean(-1)
        assert np.abs(gray - frames).mean() < 3.0
        assert frames.std(0).mean() > 1.0  # the mouth moves


def test_rerun_is_a_noop_and_resume_rebuilds_missing_files(corpus, tmp_path):
    out, info = corpus
    stamp = (out / "corpus.json").stat().st_mtime_ns
    assert synthesize_grid(out, speakers=SPEAKERS, utterances=UTTERANCES, seed=3, roi_size=ROI,
                           progress=False) == info
    assert (out / "corpus.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="different settings"):
        synthesize_grid(out, speakers=SPEAKERS, utterances=UTTERANCES, seed=4, roi_size=ROI, progress=False)

    # an interrupted run (no corpus.json, one file missing) resumes to the same corpus
    part = tmp_path / "part"
    first = synthesize_grid(part, speakers=3, utterances=1, seed=3, roi_size=ROI, progress=False)
    rec = _lines(part / "train.jsonl")[0]
    wav = (part / rec["audio"]).read_bytes()
    (part / "corpus.json").unlink()
    (part / rec["audio"]).unlink()
    assert synthesize_grid(part, speakers=3, utterances=1, seed=3, roi_size=ROI, progress=False) == first
    assert (part / rec["audio"]).read_bytes() == wav


def test_invalid_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="speakers"):
        synthesize_grid(tmp_path, speakers=2, utterances=1)
    with pytest.raises(ConfigError, match="even"):
        synthesize_grid(tmp_path, speakers=3, utterances=1, roi_size=33)
    with pytest.raises(ConfigError, match="utterances"):
        synthesize_grid(tmp_path, speakers=3, utterances=0)


def test_cli_writes_the_corpus(tmp_path, capsys):
    from xmodal.cli import main

    out = tmp_path / "cli"
    code = main(["data", "synth-grid", "--out", str(out), "--speakers", "3", "--utterances", "1",
                 "--roi-size", "16", "--seed", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "synthetic-grid" in printed and "train.jsonl" in printed and "corpus.json" in printed
    assert json.loads((out / "corpus.json").read_text())["request"]["roi_size"] == 16
    assert main(["data", "synth-grid", "--out", str(out), "--speakers", "2", "--utterances", "1"]) == 2

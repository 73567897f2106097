import json
import math
import struct
import wave

import numpy as np
import pytest
import torch

from xmodal.data import av as avdata
from xmodal.data.av import (
    AudioConfig,
    AVSpeechDataset,
    VideoConfig,
    collate_av,
    decode_video,
    load_audio,
    read_av_manifest,
)
from xmodal.data.grid import synthesize_grid
from xmodal.data.vocab import CharVocab
from xmodal.errors import ConfigError, DataError

ROI, CROP = 32, 28
EVAL_VIDEO = VideoConfig(crop_size=CROP, backend="decord")
AUDIO = AudioConfig(n_mels=40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("avgrid")
    synthesize_grid(out, speakers=3, utterances=2, seed=1, roi_size=ROI, progress=False)
    return out


@pytest.fixture(scope="module")
def rows(corpus):
    return [json.loads(line) for s in ("train", "val", "test") for line in (corpus / f"{s}.jsonl").open()]


def write_manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def absolute(corpus, row, **changes):
    row = {**row, "video": str(corpus / row["video"]), "audio": str(corpus / row["audio"])}
    row.update(changes)
    return row


def write_wav(path, samples, rate):
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


# ---------------------------------------------------------------------------------------------- manifest


def test_manifest_paths_are_relative_to_the_manifest(corpus, rows):
    recs = read_av_manifest(corpus / "train.jsonl")
    assert recs[0].video == corpus / recs[0].video.relative_to(corpus)
    assert all(r.video.is_file() and r.audio.is_file() for r in recs)
    assert recs[0].line == 1 and recs[0].transcript and recs[0].speaker


@pytest.mark.parametrize("text, message", [
    ('{"id": "a", "video": "a.mp4"}\n{"id": "b", "video": ', ":2: not valid JSON"),
    ('{"id": "a"}', ":1: missing required key 'video'"),
    ('{"id": "a", "video": "a.mp4", "transcript": 5}', ":1: key 'transcript' must be a string"),
    ('{"id": "a", "video": "a.mp4"}\n\n{"id": "a", "video": "b.mp4"}', ":3: duplicate id 'a' (first on line 1)"),
    ('["a"]', ":1: each line must be a JSON object"),
    ("\n", "no records"),
])
def test_manifest_errors_name_line_and_key(tmp_path, text, message):
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        read_av_manifest(path)
    assert message in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------- items


def test_item_shapes_and_targets(corpus):
    vocab = CharVocab()
    ds = AVSpeechDataset(corpus / "train.jsonl", vocab, video=EVAL_VIDEO, audio=AUDIO, train=False)
    item = ds[0]
    frames = decode_video(ds.records[0].video, "pyav")
    t = frames.shape[0]
    assert item["video"].shape == (t, 1, CROP, CROP) and item["video"].dtype == torch.float32
    assert item["audio"].dtype == torch.float32 and item["audio"].shape[1] == 40
    assert abs(item["audio"].shape[0] - 4 * t) <= 3  # 10 ms audio frames vs 40 ms video frames
    assert torch.allclose(item["audio"].mean(0), torch.zeros(40), atol=1e-4)  # per-utterance normalised
    assert item["targets"].dtype == torch.long
    assert vocab.decode(item["targets"].tolist()) == item["transcript"] == ds.records[0].transcript
    assert item["id"] == ds.records[0].id and item["speaker"] == ds.records[0].speaker
    # centre crop, normalised with the configured statistics
    centre = (frames[:, 2:2 + CROP, 2:2 + CROP] / 255.0 - EVAL_VIDEO.mean) / EVAL_VIDEO.std
    assert (item["video"][:, 0].numpy() - centre).__abs__().mean() < 0.05


def test_train_augmentation_is_seeded(corpus):
    cfg = VideoConfig(crop_size=CROP, hflip_prob=0.5, time_masks=2, time_mask_max_frames=8)
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=cfg, audio=None, train=True, seed=7)
    a, b = ds[0]["video"], ds[0]["video"]
    assert torch.equal(a, b)
    same_seed = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=cfg, audio=None, train=True, seed=7)
    assert torch.equal(same_seed[0]["video"], a)
    variants = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        variants.add(ds[0]["video"].numpy().tobytes())
    assert len(variants) > 3
    assert "audio" not in ds[0]


def test_time_masking_zeroes_whole_frames(corpus):
    base = dict(crop_size=CROP, random_crop=False, hflip_prob=0.0)
    clean = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=VideoConfig(**base), audio=None)[0]["video"]
    masked_cfg = VideoConfig(**base, time_masks=1, time_mask_max_frames=1000)
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=masked_cfg, audio=None, train=True)
    for epoch in range(5):
        ds.set_epoch(epoch)
        v = ds[0]["video"]
        zero = (v == 0).flatten(1).all(1)
        if zero.any():
            break
    assert zero.any() and not zero.all()
    assert torch.equal(v[~zero], clean[~zero])
    idx = torch.nonzero(zero).flatten()
    assert idx.max() - idx.min() + 1 == len(idx)  # one contiguous span


def test_flip_and_random_crop(corpus):
    base = AVSpeechDataset(corpus / "train.jsonl", CharVocab(),
                           video=VideoConfig(crop_size=CROP, random_crop=False, hflip_prob=0.0), audio=None)[0]
    flip = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), train=True, audio=None,
                           video=VideoConfig(crop_size=CROP, random_crop=False, hflip_prob=1.0, time_masks=0))[0]
    assert torch.equal(flip["video"], base["video"].flip(-1))
    crops = set()
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), train=True, audio=None,
                         video=VideoConfig(crop_size=CROP, hflip_prob=0.0, time_masks=0))
    for epoch in range(8):
        ds.set_epoch(epoch)
        crops.add(ds[0]["video"].numpy().tobytes())
    assert len(crops) > 1


def test_decord_and_pyav_agree(corpus, rows):
    path = corpus / rows[0]["video"]
    a, b = decode_video(path, "decord"), decode_video(path, "pyav")
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(int) - b).mean() < 2.0
    with pytest.raises(ConfigError, match="backend"):
        decode_video(path, "opencv")


def test_pyav_fallback_when_decord_fails(corpus, monkeypatch):
    real = avdata.decode_video
    calls = []

    def broken_decord(path, backend="decord", num_threads=1):
        calls.append(backend)
        if backend == "decord":
            raise RuntimeError("decord cannot open this file")
        return real(path, backend, num_threads)

    monkeypatch.setattr(avdata, "decode_video", broken_decord)
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=EVAL_VIDEO, audio=None)
    assert ds[0]["video"].shape[1:] == (1, CROP, CROP)
    assert calls == ["decord", "pyav"]


# ---------------------------------------------------------------------------------------------- errors


def test_unreadable_video_names_sample_path_and_both_backends(corpus, rows, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    m = write_manifest(tmp_path / "m.jsonl", [absolute(corpus, rows[0], id="utt-broken", video=str(bad))])
    ds = AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=None)
    with pytest.raises(DataError) as e:
        ds[0]
    msg = str(e.value)
    assert "utt-broken" in msg and str(bad) in msg and "decord:" in msg and "pyav:" in msg


def test_missing_files_name_the_sample(corpus, rows, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [absolute(corpus, rows[0], id="utt-noaudio",
                                                       audio=str(tmp_path / "nowhere.wav"))])
    with pytest.raises(DataError, match=r"utt-noaudio.*nowhere\.wav.*does not exist"):
        AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=AUDIO)[0]
    m = write_manifest(tmp_path / "m2.jsonl", [absolute(corpus, rows[0], id="utt-novideo",
                                                        video=str(tmp_path / "nowhere.mp4"))])
    with pytest.raises(DataError, match=r"utt-novideo.*nowhere\.mp4.*does not exist"):
        AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=AUDIO)[0]
    no_audio_key = {k: v for k, v in absolute(corpus, rows[0], id="utt-nokey").items() if k != "audio"}
    m = write_manifest(tmp_path / "m3.jsonl", [no_audio_key])
    with pytest.raises(DataError, match=r"utt-nokey.*'audio'"):
        AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=AUDIO)
    assert AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=None)[0]["video"].ndim == 4


def test_transcript_errors_name_the_sample(corpus, rows, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [absolute(corpus, rows[0], id="utt-empty", transcript="  ")])
    with pytest.raises(DataError, match=r"utt-empty.*empty transcript"):
        AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=AUDIO)
    item = AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=AUDIO, require_transcript=False)[0]
    assert item["targets"].numel() == 0 and item["transcript"] == ""
    m = write_manifest(tmp_path / "m2.jsonl", [absolute(corpus, rows[0], id="utt-oov", transcript="set 4 now")])
    with pytest.raises(DataError, match=r"utt-oov.*'4'"):
        AVSpeechDataset(m, CharVocab(), video=EVAL_VIDEO, audio=AUDIO)
    # normalisation happens before encoding: case and punctuation are fine
    m = write_manifest(tmp_path / "m3.jsonl", [absolute(corpus, rows[0], transcript="Set Blue, at A. Now!")])
    assert AVSpeechDataset(m, CharVocab(), video=None, audio=AUDIO)[0]["transcript"] == "set blue at a now"


def test_require_transcripts_names_the_key_looked_for_and_the_keys_present(corpus, rows, tmp_path):
    from xmodal.data.av import count_transcripts, require_transcripts

    text_key = [{("text" if k == "transcript" else k): v for k, v in absolute(corpus, r).items()} for r in rows[:2]]
    records = read_av_manifest(write_manifest(tmp_path / "text.jsonl", text_key))
    with pytest.raises(DataError, match=r"text\.jsonl: none of its 2 records has the key 'transcript' \(keys present: "
                                        r"audio, id, speaker, text, video\), but the losses need"):
        require_transcripts(records, "the losses")
    empty = [absolute(corpus, r, transcript=" ,. ") for r in rows[:2]]
    with pytest.raises(DataError, match="the key 'transcript' is empty in all 2 records"):
        require_transcripts(read_av_manifest(write_manifest(tmp_path / "empty.jsonl", empty)), "scoring")
    some = [absolute(corpus, rows[0]), absolute(corpus, rows[1], transcript=None)]
    assert require_transcripts(read_av_manifest(write_manifest(tmp_path / "some.jsonl", some)), "x") == 1
    in_memory = [avdata.AVRecord(id="a", video=tmp_path / "a.mp4", extra={"text": "hi"})]
    assert count_transcripts(in_memory) == 0
    with pytest.raises(DataError, match=r"keys present: id, text, video"):
        require_transcripts(in_memory, "x")


# ---------------------------------------------------------------------------------------------- audio


def test_audio_is_resampled_when_the_file_rate_differs(tmp_path):
    t8 = np.arange(8000 * 1) / 8000
    write_wav(tmp_path / "a8k.wav", 0.5 * np.sin(2 * math.pi * 440 * t8), 8000)
    t16 = np.arange(16000 * 1) / 16000
    write_wav(tmp_path / "a16k.wav", 0.5 * np.sin(2 * math.pi * 440 * t16), 16000)
    up = load_audio(tmp_path / "a8k.wav", 16000)
    ref = load_audio(tmp_path / "a16k.wav", 16000)
    assert up.shape == ref.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(up.numpy()))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second
    assert torch.allclose(up[200:-200], ref[200:-200], atol=0.02)
    feats_up = avdata.fbank_features(up, AUDIO)
    feats_ref = avdata.fbank_features(ref, AUDIO)
    assert feats_up.shape == feats_ref.shape == (98, 40)
    with pytest.raises(DataError, match="utt-short"):
        avdata.fbank_features(torch.zeros(10), AUDIO, "utt-short")


def test_dataset_resamples_a_file_at_another_rate(corpus, rows, tmp_path):
    src = corpus / rows[0]["audio"]
    with wave.open(str(src)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    import torchaudio.functional as AF

    x8 = AF.resample(torch.from_numpy(x), 16000, 8000).numpy()
    write_wav(tmp_path / "low.wav", x8, 8000)
    m = write_manifest(tmp_path / "m.jsonl", [absolute(corpus, rows[0]),
                                              absolute(corpus, rows[0], id="low", audio=str(tmp_path / "low.wav"))])
    ds = AVSpeechDataset(m, CharVocab(), video=None, audio=AUDIO)
    assert ds[0]["audio"].shape == ds[1]["audio"].shape


def pcm_wav_bytes(rate, samples, channels=1, riff_size=None, extra_chunk=b""):
    """A 16-bit PCM WAV written byte by byte, so headers can claim anything."""
    data = np.asarray(samples, "<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * channels * 2) & 0xFFFFFFFF, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunk + b"data" + struct.pack("<I", len(data))
    body += data
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


@pytest.fixture
def no_resampling(monkeypatch):
    """Fail the test if anything tries to resample."""
    import torchaudio.functional as AF

    def refuse(*args, **kwargs):
        raise AssertionError("resampling was attempted")

    monkeypatch.setattr(AF, "resample", refuse)
    monkeypatch.setattr(avdata, "resample_audio", refuse, raising=False)
    monkeypatch.setattr(avdata, "_fft_resample", refuse, raising=False)


def test_a_wav_claiming_an_absurd_sample_rate_is_refused_before_resampling(tmp_path, no_resampling):
    """A 926-byte WAV whose header claims 1,092,676 Hz once took minutes and 18 GB to resample to 16 kHz."""
    hostile = tmp_path / "hostile.wav"
    hostile.write_bytes(pcm_wav_bytes(1_092_676, np.arange(441) * 50))
    assert hostile.stat().st_size == 926
    with pytest.raises(DataError, match=r"sample 'utt-7': audio file .*hostile\.wav: refused: .*1,092,676 Hz"):
        load_audio(hostile, 16000, "utt-7")
    # the PyAV reader (any other file name) checks the rate before decoding too
    other = tmp_path / "hostile.audio"
    other.write_bytes(hostile.read_bytes())
    with pytest.raises(DataError, match=r"sample 'utt-8': audio file .*hostile\.audio: refused: .*1,092,676 Hz"):
        load_audio(other, 16000, "utt-8")
    low = tmp_path / "low.wav"
    low.write_bytes(pcm_wav_bytes(200, np.zeros(100)))
    with pytest.raises(DataError, match=r"low\.wav: refused: .*200 Hz"):
        load_audio(low, 16000)


def test_audio_decoding_to_far_more_than_the_file_size_is_refused(tmp_path):
    path = tmp_path / "a.wav"
    path.write_bytes(pcm_wav_bytes(16000, np.zeros(1600)))
    assert load_audio(path, 16000).shape == (1600,)  # 16-bit PCM decodes to 2x its size
    with pytest.raises(DataError, match=r"a\.wav: refused: it decodes to more than .*raise audio\.max_expansion"):
        load_audio(path, 16000, max_expansion=1.5)
    other = tmp_path / "a.audio"  # PyAV stops decoding at the limit
    other.write_bytes(path.read_bytes())
    assert load_audio(other, 16000).shape == (1600,)
    with pytest.raises(DataError, match=r"a\.audio: refused: it decodes to more than"):
        load_audio(other, 16000, max_expansion=1.5)
    with pytest.raises(DataError, match=r"refused: it decodes to more than"):  # resampling would pass the limit
        load_audio(path, 48000, max_expansion=3.0)
    with pytest.raises(ConfigError, match="audio.max_expansion must be positive"):
        AudioConfig(max_expansion=0)
    assert AudioConfig().max_expansion == avdata.MAX_EXPANSION


def test_a_malformed_wav_header_falls_back_to_pyav(tmp_path):
    samples = (np.sin(np.arange(1600) / 5) * 10000).astype("<i2")
    good = tmp_path / "good.wav"
    good.write_bytes(pcm_wav_bytes(16000, samples))
    broken = tmp_path / "riff0.wav"  # RIFF size 0, as some streaming recorders write: the stdlib gives up
    broken.write_bytes(pcm_wav_bytes(16000, samples, riff_size=0))
    with pytest.raises(wave.Error):
        avdata._read_wav(broken)
    assert torch.allclose(load_audio(broken, 16000), load_audio(good, 16000), atol=1e-6)
    # a chunk size pointing past the end makes the stdlib raise a bare RuntimeError; when PyAV fails too, a
    # DataError names the sample, the file and both readers' errors
    junk = tmp_path / "junk.wav"
    junk.write_bytes(pcm_wav_bytes(16000, samples, extra_chunk=b"JUNK" + struct.pack("<I", 0x7FFFFFF0)))
    with pytest.raises(DataError, match=r"sample 'u1': audio file .*junk\.wav: cannot read it \(wave: RuntimeError"
                                        r".*; pyav: "):
        load_audio(junk, 16000, "u1")


def test_stereo_is_downmixed_the_same_way_by_both_readers(tmp_path):
    rng = np.random.default_rng(0)
    left, right = rng.integers(-20000, 20000, 2000), rng.integers(-20000, 20000, 2000)
    path = tmp_path / "stereo.wav"
    path.write_bytes(pcm_wav_bytes(16000, np.stack([left, right], 1).reshape(-1), channels=2))
    by_wave, rate_w = avdata._read_wav(path)
    by_pyav, rate_p = avdata._read_with_pyav(path)
    mean = (left + right) / 2 / 32768.0
    assert rate_w == rate_p == 16000 and by_wave.shape == by_pyav.shape == (2000,)
    np.testing.assert_allclose(by_wave, mean, atol=1e-6)
    np.testing.assert_allclose(by_pyav, mean, atol=1e-6)


def test_rates_with_a_huge_sinc_kernel_are_resampled_through_the_spectrum(tmp_path, monkeypatch):
    """44101 -> 16000 Hz would need a 16000 x 44135 sinc kernel (2.8 GB); the FFT resampler needs O(N)."""
    import torchaudio.functional as AF

    monkeypatch.setattr(AF, "resample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sinc kernel")))
    t = np.arange(44101) / 44101
    write_wav(tmp_path / "odd.wav", 0.5 * np.sin(2 * math.pi * 440 * t), 44101)
    wav = load_audio(tmp_path / "odd.wav", 16000)
    assert wav.shape == (16000,)
    assert abs(int(np.argmax(np.abs(np.fft.rfft(wav.numpy())))) - 440) <= 1
    assert float(wav.abs().max()) == pytest.approx(0.5, abs=0.02)


def test_waveform_features_are_the_resampled_waveform_batched_with_a_mask(corpus, rows, tmp_path):
    """`features: waveform` (what wav2vec2 teachers read) gives the file's samples at the configured rate."""
    src = corpus / rows[0]["audio"]
    wav = load_audio(src, 16000)
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=None, audio=AudioConfig(features="waveform"))
    assert torch.equal(ds[0]["audio"], wav) and ds[0]["audio"].dim() == 1
    batch = collate_av([ds[0], ds[1]])
    lengths = [ds[0]["audio"].numel(), ds[1]["audio"].numel()]
    assert batch["audio"].shape == (2, max(lengths)) and batch["audio_mask"].sum(1).tolist() == lengths
    low = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=None,
                          audio=AudioConfig(features="waveform", sample_rate=8000))
    assert abs(low[0]["audio"].numel() - wav.numel() / 2) <= 1


# ---------------------------------------------------------------------------------------------- batches


def test_collate_pads_and_masks(corpus):
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=EVAL_VIDEO, audio=AUDIO)
    items = [ds[0], ds[1]]
    short = dict(items[1])
    short["video"], short["audio"] = items[1]["video"][:7], items[1]["audio"][:30]
    short["targets"] = items[1]["targets"][:5]
    batch = collate_av([items[0], short])
    t0 = items[0]["video"].shape[0]
    assert batch["video"].shape == (2, t0, 1, CROP, CROP)
    assert batch["video_mask"].dtype == torch.bool
    assert batch["video_mask"].sum(1).tolist() == [t0, 7] == batch["video_lengths"].tolist()
    assert torch.equal(batch["video"][1, :7], short["video"]) and (batch["video"][1, 7:] == 0).all()
    assert batch["audio"].shape == (2, items[0]["audio"].shape[0], 40)
    assert batch["audio_mask"].sum(1).tolist() == [items[0]["audio"].shape[0], 30]
    assert (batch["audio"][1, 30:] == 0).all()
    n0 = len(items[0]["targets"])
    assert batch["targets"].shape == (2, n0) and batch["target_lengths"].tolist() == [n0, 5]
    assert (batch["targets"][1, 5:] == -1).all() and torch.equal(batch["targets"][0], items[0]["targets"])
    assert batch["ids"] == [items[0]["id"], short["id"]]
    assert batch["transcripts"][0] == items[0]["transcript"] and len(batch["speakers"]) == 2


def test_collate_rejects_mixed_shapes_naming_samples(corpus):
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=EVAL_VIDEO, audio=None)
    other = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=VideoConfig(crop_size=24), audio=None)
    a, b = ds[0], other[1]
    with pytest.raises(DataError, match=a["id"]):
        collate_av([a, b])
    with pytest.raises(DataError, match="empty"):
        collate_av([])


def test_dataloader_with_workers_matches_in_process(corpus):
    ds = AVSpeechDataset(corpus / "train.jsonl", CharVocab(), video=VideoConfig(crop_size=CROP), audio=AUDIO,
                         train=True, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_av, num_workers=1)
    batch = next(iter(loader))
    direct = collate_av([ds[0], ds[1]])
    assert torch.equal(batch["video"], direct["video"]) and torch.equal(batch["audio"], direct["audio"])


def test_config_validation():
    with pytest.raises(ConfigError, match="audio.features must be one of 'fbank', 'waveform'"):
        AudioConfig(features="mfcc")
    with pytest.raises(ConfigError, match="backend"):
        VideoConfig(backend="cv2")
    with pytest.raises(ConfigError, match="crop_size"):
        VideoConfig(crop_size=64, resize=32)
    with pytest.raises(ConfigError, match="at least one"):
        AVSpeechDataset([], CharVocab(), video=None, audio=None)

"""Audio-visual speech data: JSON-lines manifests, lip video + log-mel audio per utterance, padded batches.

Manifest lines look like {"id", "video", "audio", "transcript", "speaker"}; relative paths are resolved against
the manifest's folder. Video is decoded with decord (PyAV as fallback), turned to grayscale, cropped to the
mouth region and normalised; audio becomes per-utterance normalised log-mel filterbanks (Kaldi-style).
"""

from __future__ import annotations

import json
import math
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from xmodal.data.vocab import IGNORE_ID, CharVocab
from xmodal.errors import ConfigError, DataError

VIDEO_BACKENDS = ("decord", "pyav")
MAX_EXPANSION = 1024.0  # decoded float32 bytes allowed per byte of audio file (PCM WAV needs 2-4, lossy codecs ~100)


@dataclass
class VideoConfig:
    """Lip video preprocessing. Frames are grayscale, optionally resized (square, `resize` pixels), then
    cropped to `crop_size` (random in training, centred otherwise) and normalised with mean/std (on [0, 1]
    pixel values; the defaults are the usual LRS3 mouth-crop statistics).

    Training augmentation: horizontal flip with `hflip_prob`, and `time_masks` spans of up to
    `time_mask_max_frames` frames set to zero after normalisation (i.e. to the mean pixel).

    `backend`: decord (the faster one on mouth-crop clips) or pyav, same grey levels. decord decodes ahead of a
    slower consumer and keeps those frames, so its memory grows with frame size and clip length (370 MiB over a
    10 s 720p clip in benchmarks/bench_mouth_crops.py); PyAV holds one frame: choose pyav for full-size video.
    """

    crop_size: int = 56
    resize: int | None = None
    mean: float = 0.421
    std: float = 0.165
    backend: str = "decord"
    random_crop: bool = True
    hflip_prob: float = 0.5
    time_masks: int = 1
    time_mask_max_frames: int = 10

    def __post_init__(self) -> None:
        if self.backend not in VIDEO_BACKENDS:
            raise ConfigError(f"video.backend must be one of {VIDEO_BACKENDS}, got {self.backend!r}")
        if self.crop_size < 1 or (self.resize is not None and self.resize < self.crop_size):
            raise ConfigError(f"video.crop_size ({self.crop_size}) must be >= 1 and <= video.resize "
                              f"({self.resize})")
        if self.std <= 0:
            raise ConfigError(f"video.std must be positive, got {self.std}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ConfigError(f"video.hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if self.time_masks < 0 or self.time_mask_max_frames < 0:
            raise ConfigError("video.time_masks and video.time_mask_max_frames must be >= 0")


@dataclass
class AudioConfig:
    """Audio at `sample_rate` (files at other rates are resampled) as log-mel filterbanks (`features: fbank`) or
    the waveform itself (`features: waveform`, what wav2vec2-style teachers read).

    `max_expansion` bounds what a file may decode to: float32 samples of at most that many times its size (a
    guard against corrupt or hostile headers); raise it for genuinely very highly compressed audio."""

    sample_rate: int = 16000
    features: str = "fbank"  # fbank | waveform
    n_mels: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    normalize: bool = True  # per-utterance mean/variance normalisation of the fbank features
    max_expansion: float = MAX_EXPANSION

    def __post_init__(self) -> None:
        if self.features not in AUDIO_FEATURES:
            raise ConfigError(f"audio.features must be one of {', '.join(map(repr, AUDIO_FEATURES))}, "
                              f"got {self.features!r}")
        if self.sample_rate < 1000:
            raise ConfigError(f"audio.sample_rate must be >= 1000 Hz, got {self.sample_rate}")
        if self.n_mels < 1 or self.frame_length_ms <= 0 or self.frame_shift_ms <= 0:
            raise ConfigError("audio.n_mels, audio.frame_length_ms and audio.frame_shift_ms must be positive")
        if not self.max_expansion > 0:
            raise ConfigError(f"audio.max_expansion must be positive, got {self.max_expansion}")


@dataclass(frozen=True)
class AVRecord:
    """One manifest line with paths resolved; `line` is its 1-based line number in `source`."""

    id: str
    video: Path
    audio: Path | None = None
    transcript: str | None = None
    speaker: str | None = None
    source: str = "<memory>"
    line: int = 0
    extra: dict = field(default_factory=dict, compare=False)
    keys: tuple[str, ...] = field(default=(), compare=False)  # the keys of its manifest line, as written

    def manifest_keys(self) -> tuple[str, ...]:
        """The keys of the manifest line (for records built in memory: the fields that are set)."""
        if self.keys:
            return self.keys
        known = tuple(k for k in _KNOWN_KEYS if getattr(self, k) is not None)
        return known + tuple(self.extra)


TRANSCRIPT_KEY = "transcript"  # the manifest key holding the reference text
_KNOWN_KEYS = ("id", "video", "audio", TRANSCRIPT_KEY, "speaker")


def read_av_manifest(path: str | Path) -> list[AVRecord]:
    """Read a JSON-lines manifest; every problem names the file, the line number and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read manifest {path}: {e}") from e
    root = path.parent
    records: list[AVRecord] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict):
            raise DataError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        for key in ("id", "video"):
            if key not in row:
                raise DataError(f"{where}: missing required key {key!r} (keys present: {sorted(row)})")
        for key in _KNOWN_KEYS:
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise DataError(f"{where}: key {key!r} must be a string, got {type(row[key]).__name__}")
        sid = row["id"]
        if not sid:
            raise DataError(f"{where}: key 'id' is empty")
        if not row["video"]:
            raise DataError(f"{where}: key 'video' is empty (sample {sid!r})")
        if sid in seen:
            raise DataError(f"{where}: duplicate id {sid!r} (first on line {seen[sid]})")
        seen[sid] = n
        audio = row.get("audio")
        records.append(AVRecord(
            id=sid,
            video=root / row["video"],
            audio=root / audio if audio else None,
            transcript=row.get("transcript"),
            speaker=row.get("speaker"),
            source=str(path),
            line=n,
            extra={k: v for k, v in row.items() if k not in _KNOWN_KEYS},
            keys=tuple(row),
        ))
    if not records:
        raise DataError(f"manifest {path} has no records")
    return records


def count_transcripts(records: Sequence[AVRecord]) -> int:
    """How many records have a transcript that is not empty after normalisation."""
    return sum(bool(CharVocab.normalize(r.transcript or "")) for r in records)


def require_transcripts(records: Sequence[AVRecord], needed_by: str) -> int:
    """The number of records with a usable transcript (any fraction will do, e.g. semi-supervised training); with
    none, a DataError naming the manifest, the key looked for and the keys the manifest has."""
    n = count_transcripts(records)
    if n:
        return n
    sources = ", ".join(sorted({r.source for r in records})) or "<empty manifest>"
    keys = sorted({k for r in records for k in r.manifest_keys()})
    why = (f"the key {TRANSCRIPT_KEY!r} is empty in all {len(records)} records" if TRANSCRIPT_KEY in keys
           else f"none of its {len(records)} records has the key {TRANSCRIPT_KEY!r}")
    raise DataError(f"{sources}: {why} (keys present: {', '.join(keys) or 'none'}), but {needed_by} need reference "
                    f"transcripts; put each utterance's text under {TRANSCRIPT_KEY!r}, or drop those losses")


# ----------------------------------------------------------------------------------------------- video


Box = tuple[int, int, int, int]  # top, left, height, width in pixels


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] → uint8 gray [...] by ITU-R BT.601 luma in 16-bit fixed point (as Pillow's "L"): the one
    colour-to-gray rule for every video backend, so decord and PyAV give the same grey levels."""
    acc = rgb[..., 0].astype(np.uint32)  # two uint32 planes in all, updated in place
    acc *= 19595
    tmp = rgb[..., 1].astype(np.uint32)
    tmp *= 38470
    acc += tmp
    np.multiply(rgb[..., 2], 7471, out=tmp, dtype=np.uint32)
    acc += tmp
    acc += 32768
    acc >>= 16
    return acc.astype(np.uint8)


def _check_box(box: Box, h: int, w: int, path: Path) -> None:
    top, left, bh, bw = box
    if bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > h or left + bw > w:
        raise DataError(f"{path}: crop box (top, left, height, width) = {tuple(box)} does not fit its {h}x{w} frames")


def _resize_gray(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One uint8 gray frame → (height, width) with antialiased bilinear filtering, rounded back to uint8."""
    if frame.shape == size:
        return frame
    x = torch.from_numpy(np.ascontiguousarray(frame)).float()[None, None]
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def _decord_rgb(path: Path, num_threads: int) -> tuple[int, Iterator[np.ndarray]]:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)

    def frames() -> Iterator[np.ndarray]:
        for _ in range(len(vr)):
            try:
                yield vr.next().asnumpy()
            except StopIteration:
                return

    return len(vr), frames()


def _pyav_rgb(path: Path, num_threads: int) -> tuple[int, Iterator[np.ndarray]]:
    import av

    container = av.open(str(path))
    if not container.streams.video:
        container.close()
        raise DataError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_count = num_threads

    def frames() -> Iterator[np.ndarray]:
        with container:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")

    return int(stream.frames or 0), frames()


_RGB_READERS = {"decord": _decord_rgb, "pyav": _pyav_rgb}  # backend → (frame-count hint, RGB frame iterator)


def iter_rgb_frames(path: str | Path, backend: str = "pyav",
                    num_threads: int = 1) -> tuple[int, Iterator[np.ndarray]]:
    """(frame-count hint, 0 when unknown; iterator of uint8 RGB frames [H, W, 3]), decoded one frame at a time
    (what face-landmark detectors read)."""
    if backend not in _RGB_READERS:
        raise ConfigError(f"unknown video backend {backend!r}; choose one of {VIDEO_BACKENDS}")
    return _RGB_READERS[backend](Path(path), num_threads)


def iter_gray_frames(path: str | Path, backend: str = "decord", num_threads: int = 1, *, crop: Box | None = None,
                     resize: int | tuple[int, int] | None = None) -> tuple[int, Iterator[np.ndarray]]:
    """(frame-count hint, 0 when the container does not say; iterator of uint8 gray frames [H, W]), decoded one
    frame at a time: each RGB frame is cropped to `crop` (top, left, height, width), turned to gray
    (`rgb_to_gray`) and resized to `resize` (a side, or (height, width)) before the next one is decoded."""
    path = Path(path)
    size = (resize, resize) if isinstance(resize, int) else tuple(resize) if resize is not None else None
    if size is not None and min(size) < 1:
        raise ConfigError(f"video resize must be positive, got {resize}")
    hint, rgb_frames = iter_rgb_frames(path, backend, num_threads)

    def gray() -> Iterator[np.ndarray]:
        for rgb in rgb_frames:
            if crop is not None:
                _check_box(crop, rgb.shape[0], rgb.shape[1], path)
                top, left, h, w = crop
                rgb = rgb[top:top + h, left:left + w]
            g = rgb_to_gray(rgb)
            yield _resize_gray(g, size) if size is not None else g

    return hint, gray()


def decode_video(path: str | Path, backend: str = "decord", num_threads: int = 1, *, crop: Box | None = None,
                 resize: int | tuple[int, int] | None = None) -> np.ndarray:
    """All frames of a video as grayscale uint8 [T, H, W], decoded with decord or PyAV frame by frame (see
    `iter_gray_frames`): memory is one decoded frame plus the output, whatever the clip's length and size."""
    hint, frames = iter_gray_frames(path, backend, num_threads, crop=crop, resize=resize)
    out: np.ndarray | None = None
    n = 0
    for g in frames:
        if out is None:
            out = np.empty((max(hint, 1), *g.shape), np.uint8)
        elif n == out.shape[0]:  # the container under-reported its length: grow geometrically
            out = np.concatenate([out, np.empty((max(n // 2, 1), *g.shape), np.uint8)])
        out[n] = g
        n += 1
    if out is None or n == 0:
        raise DataError(f"{path} has no video frames")
    return out[:n] if n < out.shape[0] else out


def _load_frames(rec: AVRecord, backend: str, resize: int | None = None) -> np.ndarray:
    """Decode with the configured backend, then the other one; if both fail, name both errors. With `resize`,
    frames are resized to resize x resize as they are decoded."""
    if not rec.video.is_file():
        raise DataError(f"sample {rec.id!r}: video file {rec.video} does not exist ({rec.source}:{rec.line})")
    errors = []
    order = (backend,) + tuple(b for b in VIDEO_BACKENDS if b != backend)
    options = {} if resize is None else {"resize": resize}
    for b in order:
        try:
            return decode_video(rec.video, b, **options)
        except ImportError as e:
            errors.append(f"{b}: not installed ({e})")
        except Exception as e:  # decoders raise their own error types
            errors.append(f"{b}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    raise DataError(f"sample {rec.id!r}: cannot read video {rec.video}: " + "; ".join(errors)
                    + " (re-encode the file, e.g. as H.264 mp4)")


def _crop_offsets(h: int, w: int, size: int, random: bool, gen: torch.Generator) -> tuple[int, int]:
    if random:
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
        return top, left
    return (h - size) // 2, (w - size) // 2


def preprocess_video(frames: np.ndarray, cfg: VideoConfig, train: bool, gen: torch.Generator,
                     sample_id: str = "?") -> torch.Tensor:
    """uint8 [T, H, W] → normalised float [T, 1, crop, crop] with train-time augmentation (frames already at
    `resize` are cropped before they become float, so only the crop is ever converted)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).unsqueeze(1)  # uint8 [T, 1, H, W]
    if cfg.resize is not None and tuple(x.shape[-2:]) != (cfg.resize, cfg.resize):
        x = torch.nn.functional.interpolate(x.float().div_(255.0), size=(cfg.resize, cfg.resize), mode="bilinear",
                                            align_corners=False, antialias=True)
    t, _, h, w = x.shape
    size = cfg.crop_size
    if h < size or w < size:
        raise DataError(f"sample {sample_id!r}: frames are {h}x{w}, smaller than video.crop_size={size}; "
                        "lower crop_size or set video.resize")
    top, left = _crop_offsets(h, w, size, train and cfg.random_crop, gen)
    x = x[:, :, top:top + size, left:left + size]
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    x = (x - cfg.mean) / cfg.std
    if train:
        if cfg.hflip_prob > 0 and float(torch.rand((), generator=gen)) < cfg.hflip_prob:
            x = x.flip(-1)
        x = x.clone()
        for _ in range(cfg.time_masks):
            width = int(torch.randint(0, min(cfg.time_mask_max_frames, t) + 1, (1,), generator=gen))
            if width:
                start = int(torch.randint(0, t - width + 1, (1,), generator=gen))
                x[start:start + width] = 0.0
    return x.contiguous()


# ----------------------------------------------------------------------------------------------- audio

MIN_AUDIO_RATE, MAX_AUDIO_RATE = 1_000, 384_000  # Hz; a header outside this range is corrupt (or hostile)
_SINC_KERNEL_LIMIT = 1 << 24  # elements of torchaudio's sinc-resampling kernel; beyond it, FFT resampling


class AudioRefused(ValueError):
    """The file is readable but unsafe to decode or resample (absurd rate, decodes to far more than its size)."""


def check_sample_rate(rate: int) -> int:
    """The file's sample rate, checked against MIN_AUDIO_RATE..MAX_AUDIO_RATE before anything is decoded."""
    if not MIN_AUDIO_RATE <= int(rate) <= MAX_AUDIO_RATE:
        raise AudioRefused(f"its header claims a sample rate of {int(rate):,} Hz, outside {MIN_AUDIO_RATE:,}-"
                           f"{MAX_AUDIO_RATE:,} Hz; the file is corrupt or not audio (re-encode it, e.g. as 16 kHz "
                           "16-bit PCM WAV)")
    return int(rate)


def _check_decoded_size(nbytes: float, max_bytes: float) -> None:
    if nbytes > max_bytes:
        raise AudioRefused(f"it decodes to more than {max_bytes / 2**20:.1f} MiB of samples (audio.max_expansion "
                           "times its size); if the file is genuine, e.g. very highly compressed, raise "
                           "audio.max_expansion")


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else f"{type(e).__name__} (malformed file)"


def _read_wav(path: Path, max_bytes: float = float("inf")) -> tuple[np.ndarray, int]:
    """Integer PCM wav → float32 mono in [-1, 1] (mean of the channels) via the standard library."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        check_sample_rate(rate)
        if width not in (1, 2, 3, 4):
            raise ValueError(f"unsupported sample width {width} bytes")
        raw = w.readframes(n)  # at most what the file holds, whatever the header claims
    raw = raw[: len(raw) // (width * channels) * width * channels]  # whole frames only
    _check_decoded_size(len(raw) // width * 4, max_bytes)
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    else:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    if channels > 1:
        x = x.reshape(-1, channels).mean(1)
    return x, rate


def _read_with_pyav(path: Path, max_bytes: float = float("inf")) -> tuple[np.ndarray, int]:
    """Any format ffmpeg reads → float32 mono (mean of the channels, as `_read_wav`), decoding stopped as soon
    as the samples pass `max_bytes`."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = check_sample_rate(stream.codec_context.sample_rate or 0)
        resampler = av.AudioResampler(format="fltp", rate=rate)  # planar float [channels, n], layout kept
        chunks, nbytes = [], 0

        def take(frames) -> None:
            nonlocal nbytes
            for out in frames:
                planes = out.to_ndarray()
                nbytes += planes.size * 4
                _check_decoded_size(nbytes, max_bytes)
                chunks.append(planes.reshape(-1, planes.shape[-1]).mean(0, dtype=np.float32))

        for frame in container.decode(stream):
            take(resampler.resample(frame))
        take(resampler.resample(None))
    return (np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)), rate


def _fft_resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling through the spectrum: memory linear in the length whatever the rates."""
    n = wav.numel()
    m = math.ceil(n * new / orig)
    if n == 0 or m == 0:
        return wav.new_zeros(m)
    spec = torch.fft.rfft(wav.double())
    out = spec.new_zeros(m // 2 + 1)
    k = min(spec.numel(), out.numel())
    out[:k] = spec[:k]
    return (torch.fft.irfft(out, n=m) * (m / n)).to(wav.dtype)


def resample_audio(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """[N] from `orig` Hz to `new` Hz: torchaudio's sinc resampler, or FFT resampling for rate pairs whose
    reduced ratio would make its kernel huge (e.g. 44101 → 16000 Hz: a 16000 × 44135 kernel)."""
    import torchaudio.functional as AF

    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    width = math.ceil(6 * o / (min(o, n) * 0.99))  # torchaudio's defaults: lowpass_filter_width 6, rolloff 0.99
    if n * (o + 2 * width) <= _SINC_KERNEL_LIMIT:
        return AF.resample(wav, orig, new)
    return _fft_resample(wav, orig, new)


def load_audio(path: str | Path, sample_rate: int, sample_id: str = "?", *,
               max_expansion: float = MAX_EXPANSION) -> torch.Tensor:
    """Mono float32 waveform [N] at `sample_rate` (the mean of the channels; resampled when the file differs).

    WAV files are read with the standard library and anything else, or a WAV it cannot parse, with PyAV. Before
    decoding, the sample rate must be within MIN_AUDIO_RATE..MAX_AUDIO_RATE; the decoded samples may not exceed
    `max_expansion` times the file size (also before resampling). Both are DataErrors naming the sample and file.
    """
    path = Path(path)
    where = f"sample {sample_id!r}: audio file {path}"
    if not path.is_file():
        raise DataError(f"{where} does not exist")
    max_bytes = max_expansion * path.stat().st_size
    errors = []
    x = rate = None
    try:
        if path.suffix.lower() == ".wav":
            try:
                x, rate = _read_wav(path, max_bytes)
            except AudioRefused:
                raise
            except Exception as e:  # a malformed header: let PyAV try
                errors.append(f"wave: {_describe(e)}")
        if x is None:
            try:
                x, rate = _read_with_pyav(path, max_bytes)
            except AudioRefused:
                raise
            except Exception as e:  # decoders raise their own error types
                errors.append(f"pyav: {_describe(e)}")
                raise DataError(f"{where}: cannot read it ({'; '.join(errors)}); re-encode it, e.g. as 16 kHz "
                                "16-bit PCM WAV") from e
        if rate != sample_rate:
            _check_decoded_size(math.ceil(len(x) * sample_rate / rate) * 4, max_bytes)
    except AudioRefused as e:
        raise DataError(f"{where}: refused: {e}") from None
    wav = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if rate != sample_rate:
        wav = resample_audio(wav, rate, sample_rate)
    return wav


def fbank_features(wav: torch.Tensor, cfg: AudioConfig, sample_id: str = "?") -> torch.Tensor:
    """Kaldi-compatible log-mel filterbanks [frames, n_mels], optionally mean/variance normalised."""
    from torchaudio.compliance import kaldi

    min_len = int(cfg.sample_rate * cfg.frame_length_ms / 1000)
    if wav.numel() < min_len:
        raise DataError(f"sample {sample_id!r}: audio has {wav.numel()} samples, fewer than one "
                        f"{cfg.frame_length_ms} ms analysis frame ({min_len} samples)")
    feats = kaldi.fbank(wav.unsqueeze(0) * 32768.0, num_mel_bins=cfg.n_mels, frame_length=cfg.frame_length_ms,
                        frame_shift=cfg.frame_shift_ms, dither=0.0, energy_floor=0.0,
                        sample_frequency=cfg.sample_rate)
    if cfg.normalize:
        feats = (feats - feats.mean(0, keepdim=True)) / (feats.std(0, keepdim=True, unbiased=False) + 1e-5)
    return feats


def waveform_features(wav: torch.Tensor, cfg: AudioConfig, sample_id: str = "?") -> torch.Tensor:
    """The waveform [N] itself (batched as [B, N] with a per-sample mask), for models with their own front end."""
    if wav.numel() == 0:
        raise DataError(f"sample {sample_id!r}: the audio file has no samples")
    return wav


AUDIO_FEATURES = {"fbank": fbank_features, "waveform": waveform_features}  # AudioConfig.features → extractor


# ----------------------------------------------------------------------------------------------- data set


class AVSpeechDataset(Dataset):
    """Audio-visual utterances for lip reading. Items: id, speaker, video [T, 1, H, W], audio [Ta, n_mels]
    (or the waveform [N] with `features: waveform`),
    transcript (normalised), targets (long [L]). Pass `video=None` or `audio=None` to skip a modality.

    Augmentation (crop, flip, time masks) is a pure function of (seed, sample id, epoch) through a torch
    Generator, so it is reproducible with any number of DataLoader workers and follows a sample when the manifest
    is reordered; the engine calls `set_epoch` in every loading process to vary it between epochs. The manifest
    id is the sample key (`sample_key`, the items' "id").
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[AVRecord],
        vocab: CharVocab,
        *,
        video: VideoConfig | None,
        audio: AudioConfig | None,
        train: bool = False,
        require_transcript: bool = True,
        seed: int = 0,
    ) -> None:
        if video is None and audio is None:
            raise ConfigError("AVSpeechDataset needs at least one of video= and audio=")
        self.records = list(read_av_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest)
        self.vocab, self.video_cfg, self.audio_cfg = vocab, video, audio
        self.train, self.require_transcript, self.seed, self.epoch = train, require_transcript, seed, 0
        self._targets: list[tuple[str, list[int]]] = []
        for rec in self.records:
            where = f"sample {rec.id!r} ({rec.source}:{rec.line})"
            if audio is not None and rec.audio is None:
                raise DataError(f"{where}: no 'audio' path in the manifest; add one or load with audio=None")
            text = vocab.normalize(rec.transcript or "")
            if not text and require_transcript:
                raise DataError(f"{where}: empty transcript; fix the manifest or pass require_transcript=False")
            try:
                self._targets.append((text, vocab.encode(text, sample_id=rec.id)))
            except DataError as e:
                raise DataError(f"{e} ({rec.source}:{rec.line})") from None

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_key(self, index: int) -> str:
        return self.records[index].id

    def _generator(self, index: int) -> torch.Generator:
        from xmodal.engine.data import sample_seed

        return torch.Generator().manual_seed(sample_seed(self.seed, self.records[index].id, self.epoch))

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        text, ids = self._targets[index]
        item = {"id": rec.id, "speaker": rec.speaker or "unknown", "transcript": text,
                "targets": torch.tensor(ids, dtype=torch.long)}
        gen = self._generator(index)
        if self.video_cfg is not None:
            frames = _load_frames(rec, self.video_cfg.backend, self.video_cfg.resize)
            item["video"] = preprocess_video(frames, self.video_cfg, self.train, gen, rec.id)
        if self.audio_cfg is not None:
            wav = load_audio(rec.audio, self.audio_cfg.sample_rate, rec.id, max_expansion=self.audio_cfg.max_expansion)
            item["audio"] = AUDIO_FEATURES[self.audio_cfg.features](wav, self.audio_cfg, rec.id)
        return item


def _pad(seqs: list[torch.Tensor], ids: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [T_i, ...] tensors into [B, T_max, ...] zeros-padded, with a [B, T_max] real-frame mask."""
    trailing = {tuple(s.shape[1:]) for s in seqs}
    if len(trailing) > 1:
        shapes = ", ".join(f"{i}: {tuple(s.shape)}" for i, s in zip(ids, seqs))
        raise DataError(f"cannot batch {name}: per-frame shapes differ ({shapes}); use one crop size / n_mels")
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = seqs[0].new_zeros((len(seqs), int(lengths.max()), *seqs[0].shape[1:]))
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    mask = torch.arange(out.shape[1])[None, :] < lengths[:, None]
    return out, mask


def collate_av(samples: Sequence[dict]) -> dict:
    """Pad a list of items into a batch: video [B, T, 1, H, W] + video_mask, audio [B, Ta, F] + audio_mask,
    targets [B, L] padded with -1 + target_lengths, and lists ids, speakers, transcripts."""
    if not samples:
        raise DataError("collate_av got an empty list of samples")
    ids = [s["id"] for s in samples]
    batch: dict = {"ids": ids, "speakers": [s["speaker"] for s in samples],
                   "transcripts": [s["transcript"] for s in samples]}
    for key in ("video", "audio"):
        have = [key in s for s in samples]
        if any(have) and not all(have):
            missing = [i for i, h in zip(ids, have) if not h]
            raise DataError(f"cannot batch: samples {missing} have no {key!r} while others do")
        if all(have):
            batch[key], batch[f"{key}_mask"] = _pad([s[key] for s in samples], ids, key)
            batch[f"{key}_lengths"] = batch[f"{key}_mask"].sum(1)
    lengths = torch.tensor([len(s["targets"]) for s in samples], dtype=torch.long)
    targets = torch.full((len(samples), max(int(lengths.max()), 1)), IGNORE_ID, dtype=torch.long)
    for i, s in enumerate(samples):
        targets[i, : len(s["targets"])] = s["targets"]
    batch["targets"], batch["target_lengths"] = targets, lengths
    return batch

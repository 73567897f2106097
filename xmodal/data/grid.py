"""Synthetic GRID-like audio-visual speech corpus: eSpeak NG speech plus rendered mouth-region video.

Sentences follow the GRID grammar ("bin blue at f two now"); every speaker has a fixed voice (eSpeak
variant, pitch, rate) and a fixed mouth appearance. The corpus is a pure function of the seed, so two runs
with the same settings give the same transcripts, the same audio samples and the same decoded frames.
Splits are speaker-disjoint: whole speakers are held out for validation and test.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import platform
import wave
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xmodal.data import espeak
from xmodal.data.visemes import Appearance, render_utterance
from xmodal.errors import ConfigError, DataError
from xmodal.io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DATASET_NAME = "synthetic-grid"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")

GRID_GRAMMAR: dict[str, tuple[str, ...]] = {
    "command": ("bin", "lay", "place", "set"),
    "colour": ("blue", "green", "red", "white"),
    "preposition": ("at", "by", "in", "with"),
    "letter": tuple(c for c in "abcdefghijklmnopqrstuvwxyz" if c != "w"),
    "digit": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "adverb": ("again", "now", "please", "soon"),
}
# How a word must be written for eSpeak to say it as GRID speakers do ("a" alone is read as the article).
_SPOKEN = {"a": "eigh"}

VOICE_LANGUAGES = ("en", "en-gb-x-rp", "en-gb-scotland", "en-us")
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")

_VIDEO_CODECS = ("libx264", "mpeg4")
_SPEAKER_KEY, _SENTENCE_KEY, _RENDER_KEY, _SPLIT_KEY = 1, 2, 3, 4


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class SpeakerProfile:
    """A synthetic speaker: eSpeak voice and prosody, background noise level, and mouth appearance."""

    id: str
    voice: str
    rate: int
    pitch: int
    pitch_range: int
    noise_dbfs: float
    appearance: Appearance

    def to_dict(self) -> dict:
        return asdict(self)


def make_speakers(n: int, seed: int = 0) -> list[SpeakerProfile]:
    """`n` speakers "s01", "s02", ...; each one's voice and look depend only on (seed, speaker index)."""
    speakers = []
    for i in range(n):
        rng = _rng(seed, _SPEAKER_KEY, i)
        female = bool(rng.random() < 0.5)
        variant = str(rng.choice(FEMALE_VARIANTS if female else MALE_VARIANTS))
        language = str(rng.choice(VOICE_LANGUAGES))
        speakers.append(SpeakerProfile(
            id=f"s{i + 1:02d}",
            voice=f"{language}+{variant}",
            rate=int(rng.integers(150, 211)),
            pitch=int(rng.integers(45, 76) if female else rng.integers(25, 56)),
            pitch_range=int(rng.integers(30, 81)),
            noise_dbfs=float(rng.uniform(-60.0, -45.0)),
            appearance=Appearance.sample(rng),
        ))
    return speakers


def sample_sentence(rng: np.random.Generator) -> tuple[str, ...]:
    """One GRID sentence: command colour preposition letter digit adverb."""
    return tuple(str(rng.choice(words)) for words in GRID_GRAMMAR.values())


def sentence_code(words: Sequence[str]) -> str:
    """GRID-style file code: first letter of each word, the letter itself and the digit as a number."""
    digit = GRID_GRAMMAR["digit"].index(words[4])
    return f"{words[0][0]}{words[1][0]}{words[2][0]}{words[3]}{digit}{words[5][0]}"


def spoken_text(words: Sequence[str]) -> str:
    return " ".join(_SPOKEN.get(w, w) for w in words)


@dataclass(frozen=True)
class PlannedUtterance:
    id: str
    speaker: str
    speaker_index: int
    index: int
    words: tuple[str, ...]

    @property
    def transcript(self) -> str:
        return " ".join(self.words)


def plan_corpus(speakers: int, utterances: int, seed: int = 0) -> list[PlannedUtterance]:
    """The sentences of the corpus, without synthesising anything."""
    plan = []
    for s in range(speakers):
        for u in range(utterances):
            words = sample_sentence(_rng(seed, _SENTENCE_KEY, s, u))
            spk = f"s{s + 1:02d}"
            plan.append(PlannedUtterance(f"{spk}_{u:04d}_{sentence_code(words)}", spk, s, u, words))
    return plan


def split_speakers(speaker_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.1,
                   test_fraction: float = 0.1) -> dict[str, str]:
    """Speaker → split; at least one whole speaker each for val and test, the rest for training."""
    n = len(speaker_ids)
    if n < 3:
        raise ConfigError(f"speaker-disjoint train/val/test splits need at least 3 speakers, got {n}")
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    if n_val + n_test >= n:
        n_val, n_test = 1, 1
    order = _rng(seed, _SPLIT_KEY).permutation(n)
    split = {}
    for rank, i in enumerate(order):
        split[speaker_ids[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


@dataclass(frozen=True)
class SynthesizedUtterance:
    """Rendered audio-visual sample: video uint8 [T, H, W] at fps, mono float32 audio in [-1, 1]."""

    frames: np.ndarray
    audio: np.ndarray
    sample_rate: int
    fps: float
    phonemes: tuple[espeak.PhonemeEvent, ...]

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate


def synthesize_utterance(
    speaker: SpeakerProfile,
    words: Sequence[str],
    *,
    seed: int,
    roi_size: int = 64,
    fps: float = 25.0,
    sample_rate: int = 16000,
) -> SynthesizedUtterance:
    """Speak `words` with the speaker's voice and render the matching mouth video; deterministic in `seed`."""
    import torch

    rng = np.random.default_rng(seed)
    syn = espeak.synthesize(spoken_text(words), voice=speaker.voice, rate=speaker.rate, pitch=speaker.pitch,
                            pitch_range=speaker.pitch_range, seed=int(rng.integers(1, 2**31 - 1)))
    speech = torch.from_numpy(syn.samples.astype(np.float32) / 32768.0)
    if syn.sample_rate != sample_rate:
        with torch.no_grad():
            speech = _resampler(syn.sample_rate, sample_rate)(speech)
    speech = speech.numpy()
    lead, trail = rng.uniform(0.15, 0.35, size=2)
    n_frames = math.ceil((lead + syn.duration + trail) * fps)
    n_samples = round(n_frames * sample_rate / fps)
    audio = np.zeros(n_samples, np.float32)
    start = round(lead * sample_rate)
    speech = speech[: n_samples - start]
    audio[start:start + len(speech)] = speech
    audio += rng.standard_normal(n_samples).astype(np.float32) * np.float32(10 ** (speaker.noise_dbfs / 20))
    np.clip(audio, -1.0, 1.0, out=audio)
    shift = start / sample_rate
    phonemes = tuple(espeak.PhonemeEvent(p.phoneme, p.start + shift, p.end + shift, p.stress)
                     for p in syn.phonemes)
    frames = render_utterance(phonemes, n_samples / sample_rate, speaker.appearance, fps=fps, size=roi_size,
                              n_frames=n_frames, rng=rng)
    return SynthesizedUtterance(frames, audio, sample_rate, fps, phonemes)


@functools.lru_cache(maxsize=4)
def _resampler(orig: int, new: int):
    """torchaudio's band-limited resampler with its filter kernel computed once."""
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)


_CODEC_CACHE: dict[str, bool] = {}


def _codec_available(name: str) -> bool:
    if name not in _CODEC_CACHE:
        import av

        try:
            av.codec.Codec(name, "w")
            _CODEC_CACHE[name] = True
        except Exception:
            _CODEC_CACHE[name] = False
    return _CODEC_CACHE[name]


# /proc/cpuinfo flag → x264 instruction-set name
_X264_CPU_NAMES = (("sse", "MMX2"), ("sse", "SSE"), ("sse2", "SSE2"), ("sse2", "SSE2Fast"), ("ssse3", "SSSE3"),
                   ("sse4_1", "SSE4.1"), ("sse4_2", "SSE4.2"), ("abm", "LZCNT"), ("popcnt", "POPCNT"),
                   ("avx", "AVX"), ("fma", "FMA3"), ("bmi1", "BMI1"), ("bmi2", "BMI2"), ("avx2", "AVX2"))


@functools.lru_cache(maxsize=1)
def _x264_cpu_option() -> dict[str, str]:
    """x264's AVX-512 kernels make its output vary from run to run; keep every other instruction set."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return {}
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return {"x264-params": "asm=0"}  # unknown x86 CPU: plain C, slower but reproducible
    if not any(f.startswith("avx512") for f in flags):
        return {}
    names = [name for flag, name in _X264_CPU_NAMES if flag in flags]
    return {"x264-params": "asm=" + ",".join(names)}


def pick_video_codec(codec: str | None = None) -> str:
    """The encoder to use: `codec` if given, else libx264 when this PyAV build has it, else mpeg4."""
    candidates = (codec,) if codec else _VIDEO_CODECS
    names = [c for c in candidates if _codec_available(c)]
    if not names:
        raise ConfigError(f"this PyAV build has none of the video encoders {list(candidates)}")
    return names[0]


def encode_video(frames: np.ndarray, fps: float, codec: str | None = None) -> tuple[bytes, str]:
    """Grayscale frames uint8 [T, H, W] → mp4 bytes (yuv420p) and the codec used (libx264, else mpeg4)."""
    import av

    name = pick_video_codec(codec)
    t, h, w = frames.shape
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(name, rate=round(fps) if float(fps).is_integer() else fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # one encoder thread: multi-threaded x264 output is not bit-exact from run to run
        stream.codec_context.thread_count = 1
        if name == "libx264":
            stream.options = {"crf": "16", "preset": "fast", "threads": "1", **_x264_cpu_option()}
        else:
            stream.options = {"qscale": "2", "threads": "1"}
        for i, f in enumerate(frames):
            # Convert to yuv420p here: the encoder's implicit conversion makes x264 output vary run to run.
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="gray").reformat(format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue(), name


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] → 16-bit PCM wav bytes."""
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def _validate(speakers: int, utterances: int, seed: int, roi_size: int, fps: float, sample_rate: int) -> None:
    if speakers < 3:
        raise ConfigError(f"speakers must be at least 3 (one each for train, val and test), got {speakers}")
    if utterances < 1:
        raise ConfigError(f"utterances (per speaker) must be at least 1, got {utterances}")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    if roi_size < 16 or roi_size % 2:
        raise ConfigError(f"roi_size must be an even number of pixels >= 16 (yuv420p video), got {roi_size}")
    if not 1 <= fps <= 120:
        raise ConfigError(f"fps must be in [1, 120], got {fps}")
    if not 8000 <= sample_rate <= 48000:
        raise ConfigError(f"sample_rate must be in [8000, 48000] Hz, got {sample_rate}")


def synthesize_grid(
    out_dir: str | Path,
    speakers: int = 6,
    utterances: int = 20,
    seed: int = 0,
    roi_size: int = 64,
    fps: float = 25.0,
    sample_rate: int = 16000,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    codec: str | None = None,
    progress: bool = True,
) -> dict:
    """Write a synthetic GRID corpus to `out_dir` and return its description (also saved as corpus.json).

    Per utterance: `video/<speaker>/<id>.mp4` (grayscale mouth region, roi_size², fps) and
    `audio/<speaker>/<id>.wav` (16-bit mono at sample_rate); manifests train/val/test.jsonl with lines
    {"id", "video", "audio", "transcript", "speaker"} (paths relative to the manifest). `utterances` is per
    speaker. Re-running with the same settings into a finished folder does nothing; an interrupted run
    resumes where it stopped.
    """
    from xmodal.progress import progress as progress_bar

    _validate(speakers, utterances, seed, roi_size, fps, sample_rate)
    out = Path(out_dir)
    request = {"seed": seed, "speakers": speakers, "utterances_per_speaker": utterances, "roi_size": roi_size,
               "fps": fps, "sample_rate": sample_rate, "val_fraction": val_fraction,
               "test_fraction": test_fraction, "format_version": FORMAT_VERSION}
    corpus_file, stamp_file = out / "corpus.json", out / ".synth-request.json"
    for f in (corpus_file, stamp_file):
        if f.exists():
            previous = _read_json(f).get("request")
            if previous != request:
                raise DataError(f"{out} already holds a synthetic corpus made with different settings "
                                f"({f.name}: {previous}); choose another --out folder or delete this one")
            if f is corpus_file:
                log.info("%s is already complete; nothing to do", out)
                return _read_json(corpus_file)
    atomic_write_json(stamp_file, {"request": request})

    profiles = make_speakers(speakers, seed)
    split = split_speakers([p.id for p in profiles], seed, val_fraction, test_fraction)
    plan = plan_corpus(speakers, utterances, seed)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    codec = pick_video_codec(codec)
    total_seconds = 0.0
    pixel_stats = np.zeros(3)  # count, sum, sum of squares of uint8 pixels
    for utt in progress_bar(plan, desc="synthetic-grid", unit="utt", enabled=progress):
        spk = profiles[utt.speaker_index]
        video_rel = f"video/{utt.speaker}/{utt.id}.mp4"
        audio_rel = f"audio/{utt.speaker}/{utt.id}.wav"
        # Synthesis is cheap and deterministic, so resumed runs re-render finished utterances for the stats.
        sample = synthesize_utterance(
            spk, utt.words, seed=int(_rng(seed, _RENDER_KEY, utt.speaker_index, utt.index).integers(2**62)),
            roi_size=roi_size, fps=fps, sample_rate=sample_rate)
        if not (out / audio_rel).is_file():
            with atomic_write(out / audio_rel) as f:
                f.write(encode_wav(sample.audio, sample_rate))
        if not (out / video_rel).is_file():
            with atomic_write(out / video_rel) as f:
                f.write(encode_video(sample.frames, fps, codec)[0])
        pixel_stats += (sample.frames.size, float(sample.frames.sum(dtype=np.float64)),
                        float(np.square(sample.frames, dtype=np.float64).sum()))
        total_seconds += sample.duration
        records[split[utt.speaker]].append({"id": utt.id, "video": video_rel, "audio": audio_rel,
                                            "transcript": utt.transcript, "speaker": utt.speaker})
    for name in SPLITS:
        lines = "".join(json.dumps(r) + "\n" for r in sorted(records[name], key=lambda r: r["id"]))
        atomic_write_text(out / f"{name}.jsonl", lines)
    n, total, squares = pixel_stats
    mean = total / n / 255.0
    std = math.sqrt(max(squares / n / 255.0**2 - mean**2, 0.0))
    corpus = {
        "name": DATASET_NAME,
        "description": "Synthetic GRID-like audio-visual speech corpus: GRID-grammar sentences spoken by eSpeak "
                       "NG voices, with rendered grayscale mouth-region video. Synthetic data, not the real "
                       "GRID corpus.",
        "synthetic": True,
        "request": request,
        "generator": {"tts": f"eSpeak NG {espeak.version()}", "video_codec": codec,
                      "video": f"{roi_size}x{roi_size} gray (yuv420p mp4) at {fps} fps",
                      "audio": f"{sample_rate} Hz mono 16-bit wav"},
        "speakers": [{**p.to_dict(), "split": split[p.id]} for p in profiles],
        "splits": {s: sorted(p.id for p in profiles if split[p.id] == s) for s in SPLITS},
        "counts": {s: len(records[s]) for s in SPLITS},
        "hours": round(total_seconds / 3600, 4),
        "video_stats": {"mean": round(mean, 4), "std": round(std, 4), "scale": "rendered pixel / 255, all splits"},
        "manifests": {s: f"{s}.jsonl" for s in SPLITS},
    }
    atomic_write_json(corpus_file, corpus)
    stamp_file.unlink(missing_ok=True)
    return corpus


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}; delete it to regenerate the corpus") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} should hold a JSON object; delete it to regenerate the corpus")
    return data

"""eSpeak NG speech synthesis through ctypes, using the library and voice data shipped in `espeakng-loader`.

Returns 16-bit PCM at eSpeak's own rate (22050 Hz) together with phoneme events (eSpeak mnemonics with start
times), which the synthetic audio-visual corpus turns into mouth movements. eSpeak keeps global state, so the
library is loaded once per utterance from a private copy (see `_Engine`) and every call holds a lock.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.errors import ConfigError, XmodalError

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_SSML = 0x10
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4, "wordgap": 7}
RATE_MIN, RATE_MAX = 80, 450


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """`espeak_EVENT` from speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class PhonemeEvent:
    """One phoneme: eSpeak mnemonic without stress marks (e.g. "b", "u:", "aI"), start and end in seconds.

    stress is 2 for primary stress ("'" in eSpeak's notation), 1 for secondary (","), else 0.
    """

    phoneme: str
    start: float
    end: float
    stress: int = 0


@dataclass(frozen=True)
class WordEvent:
    """Start of a word: character offset and length in the input text, start time in seconds."""

    text_position: int
    length: int
    start: float


@dataclass(frozen=True)
class Synthesis:
    """Synthesised speech: int16 samples, their rate, and phoneme/word timings."""

    samples: np.ndarray
    sample_rate: int
    phonemes: tuple[PhonemeEvent, ...]
    words: tuple[WordEvent, ...]

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


class ESpeakError(XmodalError, RuntimeError):
    """The eSpeak NG library could not be loaded, initialised or asked to speak."""


class _Engine:
    """Process-wide eSpeak NG access; every call takes `self.lock`.

    eSpeak NG keeps synthesis state in static variables (pitch-flutter phase, gain control, noise generator)
    that carry over from one utterance to the next, so the same text would sound slightly different depending
    on what was spoken before. To make output a pure function of the inputs, each utterance runs in a fresh
    instance of the library: a private copy of the shared object is loaded, initialised, used and unloaded.
    """

    def __init__(self) -> None:
        import espeakng_loader

        try:
            src = Path(espeakng_loader.get_library_path())
            self.data_path = espeakng_loader.get_data_path()
            if not src.is_file():
                raise OSError(f"{src} does not exist")
        except (OSError, RuntimeError) as e:
            raise ESpeakError(f"cannot find eSpeak NG in the espeakng-loader package ({e}); reinstall it with "
                              "`pip install --force-reinstall espeakng-loader`") from e
        self._tmpdir = tempfile.mkdtemp(prefix="xmodal-espeak-")
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(self._tmpdir, ignore_errors=True))
        # A private path nobody else loads: unloading it really drops the library's state.
        self.lib_path = os.path.join(self._tmpdir, f"libespeak-ng-xmodal{src.suffix}")
        shutil.copyfile(src, self.lib_path)
        self.lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _SynthCallback(self._on_audio)  # must outlive every library instance
        self._libc = ctypes.CDLL(None) if os.name == "posix" else None
        self._checked_unload = False
        lib = self._load()
        self.sample_rate = self._initialise(lib)
        self.version = (lib.espeak_Info(None) or b"unknown").decode("utf-8", "replace")
        self._unload(lib)

    def _load(self) -> ctypes.CDLL:
        try:
            lib = ctypes.CDLL(self.lib_path, mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            raise ESpeakError(f"cannot load eSpeak NG from {self.lib_path}: {e}") from e
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.argtypes = []
        lib.espeak_Terminate.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        return lib

    def _initialise(self, lib: ctypes.CDLL) -> int:
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(),
                                     _INITIALIZE_PHONEME_EVENTS)
        if rate <= 0:
            raise ESpeakError(f"espeak_Initialize failed with the voice data at {self.data_path}")
        lib.espeak_SetSynthCallback(self._callback)
        return int(rate)

    def _unload(self, lib: ctypes.CDLL) -> None:
        lib.espeak_Terminate()
        _ctypes_dlclose(lib._handle)
        if not self._checked_unload:
            self._checked_unload = True
            maps = Path("/proc/self/maps")
            if maps.exists() and self.lib_path in maps.read_text():
                warnings.warn("eSpeak NG could not be unloaded between utterances; synthesis may depend on "
                              "what was spoken before", RuntimeWarning, stacklevel=3)

    def _on_audio(self, wav, n, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                name = ev.id.string.decode("utf-8", "replace")
                self._events.append((ev.type, ev.audio_position, ev.text_position, ev.length, name))
            elif ev.type == _EVENT_WORD:
                self._events.append((ev.type, ev.audio_position, ev.text_position, ev.length, ""))
            i += 1
        return 0

    def synthesize(self, text: str, voice: str, params: dict[str, int], seed: int, ssml: bool) -> Synthesis:
        lib = self._load()
        try:
            self._initialise(lib)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ConfigError(f"eSpeak NG has no voice {voice!r}; use a language code such as 'en' or "
                                  "'en-us', optionally with a variant such as 'en+m3' or 'en-us+f2'")
            for name, value in params.items():
                if lib.espeak_SetParameter(_PARAM[name], int(value), 0) != 0:
                    raise ESpeakError(f"espeak_SetParameter({name}={value}) failed")
            lib.espeak_ng_SetRandSeed(seed)
            if self._libc is not None:
                self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))  # breath noise uses libc rand()
            self._chunks, self._events = [], []
            buf = ctypes.create_string_buffer(text.encode("utf-8"))
            flags = _CHARS_UTF8 | (_SSML if ssml else 0)
            err = lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, flags, None, None)
            if err != 0:
                raise ESpeakError(f"espeak_Synth failed (error {err}) for text {text!r}")
            lib.espeak_Synchronize()
        finally:
            self._unload(lib)
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return _build(samples.astype(np.int16, copy=False), self.sample_rate, self._events)


def _ctypes_dlclose(handle: int) -> None:
    import _ctypes

    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if close is not None:
        close(handle)


def _build(samples: np.ndarray, sr: int, events: list) -> Synthesis:
    """Turn raw events into phoneme intervals; a phoneme ends where the next one starts (or at the end)."""
    duration = len(samples) / sr
    ph = [(min(pos / 1000.0, duration), name) for typ, pos, _, _, name in events if typ == _EVENT_PHONEME]
    phonemes = []
    for i, (start, name) in enumerate(ph):
        end = ph[i + 1][0] if i + 1 < len(ph) else duration
        stress = 2 if "'" in name else 1 if "," in name else 0
        phonemes.append(PhonemeEvent(name.replace("'", "").replace(",", ""), start, max(start, end), stress))
    words = tuple(WordEvent(tp - 1, ln, min(pos / 1000.0, duration))
                  for typ, pos, tp, ln, _ in events if typ == _EVENT_WORD)
    return Synthesis(samples, sr, tuple(phonemes), words)


_ENGINE: _Engine | None = None
_INIT_LOCK = threading.Lock()


def _after_fork() -> None:
    # A child forked while another thread held a lock would otherwise wait forever.
    global _INIT_LOCK
    _INIT_LOCK = threading.Lock()
    if _ENGINE is not None:
        _ENGINE.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _engine() -> _Engine:
    global _ENGINE
    with _INIT_LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def sample_rate() -> int:
    """eSpeak NG's output rate in Hz (22050 for the bundled voices)."""
    return _engine().sample_rate


def version() -> str:
    """eSpeak NG library version, e.g. "1.52.0"."""
    return _engine().version


def synthesize(
    text: str,
    *,
    voice: str = "en",
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    volume: int = 100,
    word_gap: int = 0,
    seed: int = 0,
    ssml: bool = False,
) -> Synthesis:
    """Speak `text` with an eSpeak NG voice ("en", "en-us", "en+m3", ...); deterministic for a given seed.

    rate is in words per minute (80–450), pitch and pitch_range 0–100 (50 = normal), word_gap in 10 ms units.
    """
    if not RATE_MIN <= rate <= RATE_MAX:
        raise ConfigError(f"eSpeak rate must be in [{RATE_MIN}, {RATE_MAX}] words per minute, got {rate}")
    for name, value in (("pitch", pitch), ("pitch_range", pitch_range)):
        if not 0 <= value <= 100:
            raise ConfigError(f"eSpeak {name} must be in [0, 100], got {value}")
    if not text.strip():
        raise ConfigError("cannot synthesise empty text")
    params = {"rate": int(rate), "pitch": int(pitch), "range": int(pitch_range), "volume": int(volume),
              "wordgap": int(word_gap)}
    eng = _engine()
    with eng.lock:
        return eng.synthesize(text, voice, params, int(seed), ssml)

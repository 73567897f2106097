"""Phonemes → visemes → mouth shapes → grayscale mouth-region video, for synthetic lip-reading data.

Several phonemes share a viseme (p/b/m, t/d/n/l, k/g/h, ...), so the rendered lips carry less information
than the audio, as with real lip reading. Mouth parameters follow a dominance-blending coarticulation model
(Cohen & Massaro): every phoneme pulls the mouth toward its viseme's target with a strength that decays
with distance in time, and visemes that need a firm lip posture (bilabial closure, rounding) pull harder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MOUTH_PARAMS = ("opening", "width", "rounding", "teeth", "tongue")


@dataclass(frozen=True)
class MouthShape:
    """Target mouth posture, each in [0, 1]: jaw/lip opening, lip spread, lip rounding, teeth and tongue shown."""

    opening: float
    width: float
    rounding: float
    teeth: float
    tongue: float

    def as_array(self) -> np.ndarray:
        return np.array([self.opening, self.width, self.rounding, self.teeth, self.tongue], np.float32)


@dataclass(frozen=True)
class Viseme:
    name: str
    shape: MouthShape
    dominance: float  # how strongly the viseme resists coarticulation
    reach: float  # seconds over which its influence decays outside its own interval


VISEMES: dict[str, Viseme] = {v.name: v for v in (
    Viseme("sil", MouthShape(0.03, 0.50, 0.20, 0.00, 0.00), 0.6, 0.06),
    Viseme("PBM", MouthShape(0.00, 0.45, 0.25, 0.00, 0.00), 8.0, 0.03),
    Viseme("FV", MouthShape(0.10, 0.52, 0.05, 0.95, 0.00), 4.0, 0.03),
    Viseme("TH", MouthShape(0.24, 0.55, 0.00, 0.60, 0.90), 1.5, 0.03),
    Viseme("TDNL", MouthShape(0.24, 0.55, 0.05, 0.50, 0.45), 0.5, 0.03),
    Viseme("SZ", MouthShape(0.10, 0.66, 0.00, 1.00, 0.00), 1.5, 0.03),
    Viseme("SH", MouthShape(0.20, 0.32, 0.80, 0.85, 0.00), 2.0, 0.04),
    Viseme("KG", MouthShape(0.34, 0.55, 0.10, 0.30, 0.25), 0.3, 0.03),
    Viseme("R", MouthShape(0.22, 0.38, 0.60, 0.30, 0.15), 1.0, 0.04),
    Viseme("WU", MouthShape(0.14, 0.18, 1.00, 0.00, 0.00), 3.0, 0.05),
    Viseme("IY", MouthShape(0.26, 0.90, 0.00, 0.85, 0.20), 1.5, 0.04),
    Viseme("EH", MouthShape(0.50, 0.66, 0.10, 0.45, 0.30), 1.0, 0.04),
    Viseme("AA", MouthShape(0.90, 0.60, 0.10, 0.30, 0.40), 1.5, 0.04),
    Viseme("OW", MouthShape(0.60, 0.32, 0.85, 0.10, 0.20), 1.5, 0.05),
)}

# eSpeak NG English phoneme mnemonics (stress marks removed). Diphthongs move between two visemes.
PHONEME_VISEMES: dict[str, tuple[str, ...]] = {
    **{p: ("PBM",) for p in ("p", "b", "m")},
    **{p: ("FV",) for p in ("f", "v")},
    **{p: ("TH",) for p in ("T", "D")},
    **{p: ("TDNL",) for p in ("t", "d", "n", "l", "t#", "d#", "n-", "l-", "t[", "d[", "t2", "d2", "L")},
    **{p: ("SZ",) for p in ("s", "z", "s#", "z#")},
    **{p: ("SH",) for p in ("S", "Z", "tS", "dZ", "S;", "Z;")},
    **{p: ("KG",) for p in ("k", "g", "N", "h", "x", "?", "n^", "k#", "g#")},
    **{p: ("R",) for p in ("r", "r-", "*", "@r")},
    **{p: ("WU",) for p in ("w", "w#", "u:", "U", "u", "W")},
    **{p: ("IY",) for p in ("i:", "i", "I", "I#", "I2", "j", "y", "i@3")},
    **{p: ("EH",) for p in ("E", "e", "@", "@2", "@5", "@L", "3", "3:", "a#", "E2", "E#", "e#")},
    **{p: ("AA",) for p in ("a", "A:", "A", "V", "aa", "A#", "a2")},
    **{p: ("OW",) for p in ("O:", "O", "0", "o", "O2", "o:")},
    "aI": ("AA", "IY"), "aI2": ("AA", "IY"), "aI3": ("AA", "IY"), "aU": ("AA", "WU"), "eI": ("EH", "IY"),
    "oU": ("OW", "WU"), "OI": ("OW", "IY"), "e@": ("EH", "EH"), "i@": ("IY", "EH"), "U@": ("WU", "EH"),
    "A@": ("AA", "R"), "o@": ("OW", "R"), "O@": ("OW", "R"), "aI@": ("AA", "IY", "EH"),
    "aU@": ("AA", "WU", "EH"), "@U": ("EH", "WU"),
}

_VOWEL_START = {"a": "AA", "A": "AA", "V": "AA", "e": "EH", "E": "EH", "@": "EH", "3": "EH", "i": "IY",
                "I": "IY", "o": "OW", "O": "OW", "0": "OW", "u": "WU", "U": "WU"}


def phoneme_visemes(phoneme: str) -> tuple[str, ...]:
    """Viseme sequence for an eSpeak mnemonic; unknown mnemonics fall back by stripping modifiers."""
    p = phoneme.replace("'", "").replace(",", "").replace("%", "").replace("=", "")
    if not p or p.startswith("_") or p in ("|", "||"):
        return ("sil",)
    if p in PHONEME_VISEMES:
        return PHONEME_VISEMES[p]
    stripped = p.rstrip("#:;-[23456L^")
    if stripped in PHONEME_VISEMES:
        return PHONEME_VISEMES[stripped]
    if p[:2] in PHONEME_VISEMES:
        return PHONEME_VISEMES[p[:2]]
    if p[0] in PHONEME_VISEMES:
        return PHONEME_VISEMES[p[0]]
    return (_VOWEL_START.get(p[0], "KG"),)


def viseme_segments(phonemes: Sequence, duration: float) -> list[tuple[str, float, float]]:
    """(viseme, start, end) intervals from phoneme events (objects with phoneme/start/end or tuples)."""
    segs: list[tuple[str, float, float]] = []
    for ev in phonemes:
        name, start, end = (ev.phoneme, ev.start, ev.end) if hasattr(ev, "phoneme") else ev
        start, end = max(0.0, float(start)), min(float(end), duration)
        if end <= start:
            continue
        vis = phoneme_visemes(name)
        step = (end - start) / len(vis)
        segs.extend((v, start + k * step, start + (k + 1) * step) for k, v in enumerate(vis))
    return segs


def mouth_track(
    phonemes: Sequence, duration: float, fps: float = 25.0, n_frames: int | None = None, subsamples: int = 3
) -> np.ndarray:
    """Per-frame mouth parameters [T, 5] (MOUTH_PARAMS order) by dominance blending of viseme targets.

    Frame k integrates the mouth over its exposure window around (k + 0.5) / fps, like a camera shutter.
    """
    if n_frames is None:
        n_frames = int(np.ceil(duration * fps - 1e-9))
    segs = viseme_segments(phonemes, duration)
    centre = (np.arange(n_frames, dtype=np.float64) + 0.5) / fps
    offsets = (np.arange(subsamples) - (subsamples - 1) / 2) / (fps * 2 * subsamples)
    t = (centre[:, None] + offsets[None, :]).reshape(-1)  # [T*S]
    # silence before the first and after the last phoneme
    segs = [("sil", -1.0, segs[0][1] if segs else duration)] + segs + [("sil", segs[-1][2] if segs else 0.0,
                                                                         duration + 1.0)]
    starts = np.array([s for _, s, _ in segs])
    ends = np.array([e for _, _, e in segs])
    dom = np.array([VISEMES[v].dominance for v, _, _ in segs])
    reach = np.array([VISEMES[v].reach for v, _, _ in segs])
    targets = np.stack([VISEMES[v].shape.as_array() for v, _, _ in segs]).astype(np.float64)  # [N, 5]
    dist = np.maximum(0.0, np.maximum(starts[None, :] - t[:, None], t[:, None] - ends[None, :]))  # [T*S, N]
    weight = dom[None, :] * np.exp(-dist / reach[None, :]) + 1e-12
    params = (weight @ targets) / weight.sum(1, keepdims=True)
    params = params.reshape(n_frames, subsamples, len(MOUTH_PARAMS)).mean(1)
    if not len(params):
        return np.zeros((0, len(MOUTH_PARAMS)), np.float32)
    return np.clip(params, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Appearance:
    """Per-speaker look of the mouth region (intensities in [0, 1], sizes relative to the image side)."""

    skin: float = 0.62
    lip_tone: float = 0.68  # lip brightness as a fraction of skin brightness
    upper_lip: float = 0.085
    lower_lip: float = 0.11
    mouth_size: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0
    noise: float = 0.015
    jitter: float = 0.01  # head-motion amplitude, fraction of the image side
    shading: float = 0.15

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Appearance:
        """A random but plausible speaker appearance."""
        return cls(
            skin=float(rng.uniform(0.35, 0.80)),
            lip_tone=float(rng.uniform(0.55, 0.80)),
            upper_lip=float(rng.uniform(0.065, 0.105)),
            lower_lip=float(rng.uniform(0.085, 0.135)),
            mouth_size=float(rng.uniform(0.85, 1.15)),
            offset_x=float(rng.uniform(-0.05, 0.05)),
            offset_y=float(rng.uniform(-0.05, 0.05)),
            noise=float(rng.uniform(0.005, 0.03)),
            jitter=float(rng.uniform(0.003, 0.015)),
            shading=float(rng.uniform(0.05, 0.25)),
        )


def _soft(z: np.ndarray) -> np.ndarray:
    """Anti-aliased step: 0 → 1 over about one pixel."""
    return 0.5 + 0.5 * np.tanh(z)


def _smooth_walk(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Slow random motion: white noise smoothed over ~half a second, scaled to `scale`."""
    if n == 0:
        return np.zeros(0)
    x = rng.standard_normal(n + 24)
    k = np.hanning(13)
    y = np.convolve(x, k / k.sum(), mode="same")[12:12 + n]
    return y / (y.std() + 1e-8) * scale if n > 1 else y * scale


def render_mouth(
    params: np.ndarray, appearance: Appearance, size: int = 64, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Grayscale mouth-region frames, uint8 [T, size, size], from mouth parameters [T, 5]."""
    app = appearance
    rng = rng if rng is not None else np.random.default_rng(0)
    params = np.asarray(params, np.float32)
    n = params.shape[0]
    s = float(size)
    f32 = np.float32
    op, wd, rd, th, tg = (params[:, i][:, None, None] for i in range(5))
    jx = _smooth_walk(rng, n, app.jitter * s).astype(f32)[:, None, None]
    jy = _smooth_walk(rng, n, app.jitter * s).astype(f32)[:, None, None]
    gain = (1.0 + _smooth_walk(rng, n, 0.02)).astype(f32)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(f32) + f32(0.5)
    x, y = xx[None], yy[None]
    cx = s / 2 + app.offset_x * s + jx
    cy = s / 2 + app.offset_y * s + jy + op * (0.04 * s)  # the jaw drops as the mouth opens
    k = s * app.mouth_size
    half_w = k * (0.34 + 0.16 * (wd - 0.5) - 0.07 * rd)
    half_h = k * 0.16 * op  # inner opening half-height
    upper = k * app.upper_lip * (1 + 0.6 * rd)
    lower = k * app.lower_lip * (1 + 0.5 * rd)
    u = (x - cx) / half_w
    prof = np.sqrt(np.clip(1 - u * u, 0, 1))
    inner_w = half_w * (0.78 + 0.12 * rd)
    prof_in = np.sqrt(np.clip(1 - ((x - cx) / inner_w) ** 2, 0, 1))
    bow = 0.012 * k * np.exp(-((u / 0.14) ** 2))  # cupid's bow: a dip at the centre of the upper lip
    top = cy - (half_h + upper) * prof + bow
    bottom = cy + (half_h + lower) * prof
    sharp = f32(1.2)
    lips = _soft((y - top) * sharp) * _soft((bottom - y) * sharp) * _soft((half_w - np.abs(x - cx)) * sharp)
    in_top = cy - half_h * prof_in
    in_bot = cy + half_h * prof_in
    inner = (_soft((y - in_top) * sharp) * _soft((in_bot - y) * sharp)
             * _soft((inner_w - np.abs(x - cx)) * sharp) * (half_h > 0.25))
    teeth_h = th * (0.5 * half_h + 0.6)
    teeth = inner * _soft((in_top + teeth_h - y) * sharp)
    tongue_h = tg * 0.6 * half_h
    tongue = inner * _soft((y - (in_bot - tongue_h)) * sharp) * (tg > 0.05)
    seam = np.exp(-(((y - cy) / 0.7) ** 2)) * prof * (1 - np.clip(half_h / 1.5, 0, 1))  # closed-lip line

    shade = 1 - app.shading * ((y - s / 2) / s) ** 2 * 4 - 0.5 * app.shading * ((x - s / 2) / s) ** 2 * 4
    chin = 1 - 0.12 * _soft((y - (cy + 0.38 * k)) * 0.3)
    img = app.skin * shade * chin
    lip_c = app.skin * app.lip_tone * (1 + 0.08 * (y > cy))  # the lower lip catches more light
    img = img * (1 - lips) + lip_c * lips
    img = img * (1 - 0.5 * seam) + 0.5 * seam * app.skin * app.lip_tone * 0.45
    img = img * (1 - inner) + 0.06 * inner
    img = img * (1 - teeth) + 0.85 * teeth
    img = img * (1 - tongue) + app.skin * 0.55 * tongue
    img = img * gain + rng.standard_normal(img.shape).astype(f32) * f32(app.noise)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render_utterance(
    phonemes: Sequence,
    duration: float,
    appearance: Appearance,
    *,
    fps: float = 25.0,
    size: int = 64,
    n_frames: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Mouth-region video uint8 [T, size, size] for phoneme timings over `duration` seconds."""
    track = mouth_track(phonemes, duration, fps=fps, n_frames=n_frames)
    return render_mouth(track, appearance, size=size, rng=rng)

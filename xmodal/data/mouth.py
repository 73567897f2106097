"""Mouth crops from facial landmarks: face video + per-frame landmarks → fixed-size grayscale mouth video.

Per frame (as in the usual LRS preparation): landmarks smoothed over a window of frames, a similarity transform
from a few stable points (eye corners, nose, mouth corners) onto a reference face, a `crop_size` square centred on
the mouth in that reference frame, sampled bilinearly from the gray frame. Frames are decoded, cropped and
encoded one at a time, and the audio track is copied, so memory does not grow with the clip.

Landmarks are an input: 68 points (dlib / face_alignment order), mediapipe's 478-point face mesh, or the
4 keypoints (eyes, nose tip, mouth centre) auto_avsr's mediapipe detector keeps, as the `.pkl` files auto_avsr's
preparation writes (a list with one [N, 2] array of (x, y) per frame, None where no face was found) or `.npy` /
`.npz` arrays [T, N, 2] (NaN where missing). `LANDMARK_DETECTORS` is the slot for a detector that makes them.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from xmodal.errors import ConfigError, DataError
from xmodal.registry import Registry

log = logging.getLogger(__name__)

LANDMARK_SUFFIXES = (".pkl", ".npy", ".npz")


# ------------------------------------------------------------------------------------------------ schemes


@dataclass(frozen=True)
class LandmarkScheme:
    """Which landmarks anchor the face (`stable`, with their `reference` (x, y) positions in a reference face
    of `REFERENCE_SIZE` pixels) and which mark the mouth (`mouth`, whose mean is the crop centre)."""

    name: str
    points: int
    stable: tuple[int, ...]
    reference: tuple[tuple[float, float], ...]
    mouth: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.stable) != len(self.reference) or len(self.stable) < 2:
            raise ConfigError(f"landmark scheme {self.name!r}: needs >= 2 stable points, each with a reference")
        if max(self.stable + self.mouth) >= self.points:
            raise ConfigError(f"landmark scheme {self.name!r}: an index is outside its {self.points} points")


REFERENCE_SIZE = 256  # the reference face lives in a 256 x 256 frame; crops are taken at that scale
# Reference face (x, y), frontal, 256 x 256: outer eye corners 96 px apart, mouth 80 px below the eye line.
_EYE_OUTER_R, _EYE_INNER_R, _EYE_INNER_L, _EYE_OUTER_L = (80.0, 110.0), (112.0, 112.0), (144.0, 112.0), (176.0, 110.0)
_NOSE_BRIDGE, _NOSE_BOTTOM = (128.0, 125.0), (128.0, 160.0)
_MOUTH_R, _MOUTH_L = (100.0, 190.0), (156.0, 190.0)

LANDMARK_SCHEMES: Registry[LandmarkScheme] = Registry("landmark scheme")
_BUILTIN_SCHEMES = (  # found by point count without importing plugins
    LandmarkScheme("ibug68", 68, stable=(28, 33, 36, 39, 42, 45, 48, 54),
                   reference=(_NOSE_BRIDGE, _NOSE_BOTTOM, _EYE_OUTER_R, _EYE_INNER_R, _EYE_INNER_L, _EYE_OUTER_L,
                              _MOUTH_R, _MOUTH_L),
                   mouth=tuple(range(48, 68))),
    LandmarkScheme("mediapipe478", 478, stable=(168, 2, 33, 133, 362, 263, 61, 291),
                   reference=((128.0, 108.0), _NOSE_BOTTOM, _EYE_OUTER_R, _EYE_INNER_R, _EYE_INNER_L, _EYE_OUTER_L,
                              _MOUTH_R, _MOUTH_L),
                   mouth=(0, 17, 13, 14, 61, 291, 78, 308)),
    LandmarkScheme("mediapipe4", 4, stable=(0, 1, 2, 3),  # right eye, left eye, nose tip, mouth centre
                   reference=((96.0, 111.0), (160.0, 111.0), (128.0, 152.0), (128.0, 190.0)), mouth=(3,)),
)
for _scheme in _BUILTIN_SCHEMES:
    LANDMARK_SCHEMES.register(_scheme.name, _scheme)


def scheme_for(points: int, name: str = "auto") -> LandmarkScheme:
    """The named scheme, or (name "auto") the registered one with this many points."""
    if name != "auto":
        scheme = LANDMARK_SCHEMES.get(name)
        if scheme.points != points:
            raise DataError(f"landmark scheme {name!r} has {scheme.points} points, the landmarks have {points}")
        return scheme
    for scheme in _BUILTIN_SCHEMES:
        if scheme.points == points:
            return scheme
    for n in LANDMARK_SCHEMES.names():  # schemes plugins registered
        if LANDMARK_SCHEMES.get(n).points == points:
            return LANDMARK_SCHEMES.get(n)
    known = ", ".join(f"{n} ({LANDMARK_SCHEMES.get(n).points})" for n in LANDMARK_SCHEMES.names())
    raise DataError(f"no landmark scheme has {points} points (known: {known})")


# Detectors: name → factory(**options) returning a callable RGB frame [H, W, 3] uint8 → [N, 2] (x, y) or None.
# None ships with xmodal (no face-landmark detector carries its model in its wheel); plugins register theirs.
LANDMARK_DETECTORS: Registry[Callable[..., Callable[[np.ndarray], np.ndarray | None]]] = Registry("landmark detector")


# ------------------------------------------------------------------------------------------------ landmark files


class _LandmarkUnpickler(pickle.Unpickler):
    """Unpickles lists of numpy arrays and nothing else: a landmarks file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")


def load_landmarks(path: str | Path) -> list[np.ndarray | None]:
    """Per-frame landmarks [N, 2] float64 (None where missing) from a .pkl (auto_avsr) or .npy/.npz file."""
    path = Path(path)
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                obj = _LandmarkUnpickler(f).load()
        elif path.suffix in (".npy", ".npz"):
            obj = np.load(path, allow_pickle=False)
            if isinstance(obj, np.lib.npyio.NpzFile):
                with obj:
                    if len(obj.files) != 1:
                        raise DataError(f"{path}: expected one array in the .npz, found {obj.files}")
                    obj = obj[obj.files[0]]
        else:
            raise DataError(f"{path}: landmarks must be {', '.join(LANDMARK_SUFFIXES)} files")
    except DataError:
        raise
    except Exception as e:  # unpickling and numpy raise many types
        raise DataError(f"cannot read landmarks {path}: {type(e).__name__}: {e}") from e
    frames = list(obj) if isinstance(obj, (list, tuple, np.ndarray)) else None
    if frames is None:
        raise DataError(f"{path}: expected a per-frame list of [N, 2] arrays, got {type(obj).__name__}")
    out: list[np.ndarray | None] = []
    shape = None
    for t, lm in enumerate(frames):
        if lm is None:
            out.append(None)
            continue
        a = np.asarray(lm, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 2:
            raise DataError(f"{path}: frame {t} has landmarks of shape {list(a.shape)}, expected [N, 2] (x, y)")
        if shape is not None and a.shape != shape:
            raise DataError(f"{path}: frame {t} has {a.shape[0]} landmarks, earlier frames {shape[0]}")
        shape = a.shape
        out.append(None if not np.isfinite(a).all() else a)
    return out


def find_landmarks(root: Path, rel: Path) -> Path | None:
    """`root/rel` with a landmarks suffix (auto_avsr mirrors the video tree), the first that exists."""
    for suffix in LANDMARK_SUFFIXES:
        p = (root / rel).with_suffix(suffix)
        if p.is_file():
            return p
    return None


# ------------------------------------------------------------------------------------------------ geometry


@dataclass
class MouthCropConfig:
    """`crop_size` pixels square (even: yuv420p) at the reference face's scale; landmarks averaged over `window`
    frames centred on each frame; clips with more than `max_missing` of their frames without landmarks refused."""

    crop_size: int = 96
    window: int = 12
    max_missing: float = 0.5
    scheme: str = "auto"

    def __post_init__(self) -> None:
        if self.crop_size < 2 or self.crop_size % 2:
            raise ConfigError(f"crop_size must be an even number >= 2 (yuv420p video), got {self.crop_size}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1 frame, got {self.window}")
        if not 0.0 <= self.max_missing < 1.0:
            raise ConfigError(f"max_missing must be in [0, 1), got {self.max_missing}")


def fill_missing(landmarks: Sequence[np.ndarray | None], max_missing: float, clip: str = "?") -> np.ndarray:
    """[T, N, 2]: missing frames linearly interpolated between their neighbours (held at the ends); more than
    `max_missing` of the frames missing is a DataError naming the clip."""
    t = len(landmarks)
    valid = [i for i, lm in enumerate(landmarks) if lm is not None]
    if t == 0:
        raise DataError(f"{clip}: the landmarks have no frames")
    missing = t - len(valid)
    if not valid or missing > max_missing * t:
        raise DataError(f"{clip}: {missing} of {t} frames have no landmarks, more than max_missing="
                        f"{max_missing:g}; refused (detect landmarks again or raise max_missing)")
    ref = landmarks[valid[0]]
    out = np.empty((t, *ref.shape), np.float64)
    idx = np.asarray(valid)
    stack = np.stack([landmarks[i] for i in valid])
    for i in range(t):
        j = np.searchsorted(idx, i)
        if j < len(idx) and idx[j] == i:
            out[i] = stack[j]
        elif j == 0:
            out[i] = stack[0]
        elif j == len(idx):
            out[i] = stack[-1]
        else:
            a, b = idx[j - 1], idx[j]
            w = (i - a) / (b - a)
            out[i] = (1 - w) * stack[j - 1] + w * stack[j]
    return out


def smooth_landmarks(lm: np.ndarray, window: int) -> np.ndarray:
    """Mean over a centred window of `window` frames (narrower, still symmetric, at the clip's ends): jitter is
    averaged out, and steady head motion is not delayed (a symmetric window has no lag on a linear path)."""
    t = lm.shape[0]
    half = window // 2
    csum = np.concatenate([np.zeros((1, *lm.shape[1:])), np.cumsum(lm, axis=0)])
    out = np.empty_like(lm)
    for i in range(t):
        m = min(half, i, t - 1 - i)
        out[i] = (csum[i + m + 1] - csum[i - m]) / (2 * m + 1)
    return out


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking src [K, 2] to dst
    [K, 2], as a 2 x 3 matrix (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s ** 2).sum() / len(src)
    if var <= 1e-12:
        raise DataError("the stable landmarks coincide; cannot align the face")
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    e = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / var
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def crop_transforms(lm: np.ndarray, scheme: LandmarkScheme, crop_size: int) -> np.ndarray:
    """[T, 2, 3]: for each frame, the map from crop pixel (x, y) to source-frame (x, y)."""
    ref = np.asarray(scheme.reference, np.float64)
    out = np.empty((lm.shape[0], 2, 3))
    half = (crop_size - 1) / 2.0
    for i, pts in enumerate(lm):
        a = similarity_transform(pts[list(scheme.stable)], ref)  # source → reference
        centre = a[:, :2] @ pts[list(scheme.mouth)].mean(0) + a[:, 2]
        inv_lin = np.linalg.inv(a[:, :2])
        origin = centre - half  # reference coordinates of crop pixel (0, 0)
        out[i, :, :2] = inv_lin
        out[i, :, 2] = inv_lin @ (origin - a[:, 2])
    return out


def warp_crop(gray: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """Bilinear sample of a uint8 [H, W] frame at `transform` @ (x, y, 1) for each crop pixel; outside is 0."""
    h, w = gray.shape
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    sx = transform[0, 0] * xs + transform[0, 1] * ys + transform[0, 2]
    sy = transform[1, 0] * xs + transform[1, 1] * ys + transform[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    acc = np.zeros((size, size), np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            vals = gray[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)].astype(np.float32)
            acc += np.where(ok, vals, 0.0) * wx * wy
    return np.clip(acc + 0.5, 0, 255).astype(np.uint8)


def prepare_transforms(landmarks: Sequence[np.ndarray | None], cfg: MouthCropConfig, clip: str = "?") -> np.ndarray:
    """Per-frame crop transforms [T, 2, 3] from raw landmarks: fill gaps, smooth, align to the reference face."""
    first = next((lm for lm in landmarks if lm is not None), None)
    if first is None:
        raise DataError(f"{clip}: no frame has landmarks; refused")
    scheme = scheme_for(first.shape[0], cfg.scheme)
    lm = smooth_landmarks(fill_missing(landmarks, cfg.max_missing, clip), cfg.window)
    return crop_transforms(lm, scheme, cfg.crop_size)


def crop_mouths(frames: Iterable[np.ndarray], transforms: np.ndarray, cfg: MouthCropConfig,
                clip: str = "?") -> Iterator[np.ndarray]:
    """Gray frames → mouth crops uint8 [crop, crop], one at a time; a frame count other than the transforms'
    is a DataError naming the clip."""
    n = 0
    for gray in frames:
        if n >= len(transforms):
            raise DataError(f"{clip}: the video has more frames than the {len(transforms)} frames of landmarks; "
                            "the landmarks belong to another clip or were cut short")
        yield warp_crop(gray, transforms[n], cfg.crop_size)
        n += 1
    if n != len(transforms):
        raise DataError(f"{clip}: the video has {n} frames but the landmarks have {len(transforms)}; the landmarks "
                        "belong to another clip or another frame rate")


# ------------------------------------------------------------------------------------------------ clips


@dataclass
class ClipResult:
    frames: int
    audio: bool


def detect_landmarks(video: Path, detector: Callable[[np.ndarray], np.ndarray | None]) -> list[np.ndarray | None]:
    """Run a landmark detector over a clip one RGB frame at a time."""
    from xmodal.data.av import iter_rgb_frames

    _, frames = iter_rgb_frames(video, "pyav")
    return [None if (lm := detector(rgb)) is None else np.asarray(lm, np.float64) for rgb in frames]


def write_mouth_clip(video: str | Path, landmarks: Sequence[np.ndarray | None], out: str | Path,
                     cfg: MouthCropConfig | None = None, clip: str | None = None) -> ClipResult:
    """Crop the mouth from every frame of `video` and write it to `out` (mp4, gray as yuv420p, the input's frame
    rate) with the first audio track copied unchanged. Written to a temporary file and renamed, so a refused or
    failed clip leaves nothing behind."""
    import av

    from xmodal.data.av import rgb_to_gray
    from xmodal.data.grid import pick_video_codec

    cfg = cfg or MouthCropConfig()
    video, out = Path(video), Path(out)
    clip = clip or str(video)
    transforms = prepare_transforms(landmarks, cfg, clip)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.mp4")
    try:
        with av.open(str(video)) as src:
            if not src.streams.video:
                raise DataError(f"{clip}: {video} has no video stream")
            vin = src.streams.video[0]
            hint = int(vin.frames or 0)
            if hint and hint != len(transforms):
                raise DataError(f"{clip}: the video has {hint} frames but the landmarks have {len(transforms)}; the "
                                "landmarks belong to another clip or another frame rate")
            ain = src.streams.audio[0] if src.streams.audio else None
            rate = vin.average_rate or vin.guessed_rate or Fraction(25)
            with av.open(str(tmp), "w", format="mp4") as dst:
                vout = dst.add_stream(pick_video_codec(), rate=rate)
                vout.width = vout.height = cfg.crop_size
                vout.pix_fmt = "yuv420p"
                vout.codec_context.thread_count = 1
                if vout.codec_context.name == "libx264":
                    vout.options = {"crf": "18", "preset": "fast"}
                aout = dst.add_stream_from_template(ain) if ain is not None else None

                def gray_frames() -> Iterator[np.ndarray]:
                    streams = [vin] + ([ain] if ain is not None else [])
                    for packet in src.demux(*streams):
                        if packet.stream is vin:
                            for frame in packet.decode():
                                yield rgb_to_gray(frame.to_ndarray(format="rgb24"))
                        elif packet.dts is not None:
                            packet.stream = aout
                            dst.mux(packet)

                n = 0
                for crop in crop_mouths(gray_frames(), transforms, cfg, clip):
                    frame = av.VideoFrame.from_ndarray(crop, format="gray").reformat(format="yuv420p")
                    frame.pts = n
                    n += 1
                    for packet in vout.encode(frame):
                        dst.mux(packet)
                for packet in vout.encode():
                    dst.mux(packet)
        os.replace(tmp, out)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # decoders and encoders raise their own error types
        tmp.unlink(missing_ok=True)
        raise DataError(f"{clip}: cannot crop {video}: {type(e).__name__}: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ClipResult(frames=n, audio=ain is not None)

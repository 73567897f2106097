"""Tiny media files for tests: mp4 video (gray or RGB frames) with an optional AAC audio track, and wav files."""

from __future__ import annotations

import wave

import numpy as np

from xmodal.data.grid import pick_video_codec


def write_mp4(path, frames, fps=25, audio=None, sample_rate=16000):
    """uint8 frames [T, H, W] (gray) or [T, H, W, 3] (RGB) → mp4 (yuv420p), with mono float `audio` as AAC."""
    import av

    frames = np.asarray(frames, np.uint8)
    fmt = "gray" if frames.ndim == 3 else "rgb24"
    h, w = frames.shape[1:3]
    with av.open(str(path), "w", format="mp4") as c:
        vs = c.add_stream(pick_video_codec(), rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.thread_count = 1
        a_s = None
        if audio is not None:
            a_s = c.add_stream("aac", rate=sample_rate, layout="mono")
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format=fmt).reformat(format="yuv420p")
            f.pts = i
            for p in vs.encode(f):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if a_s is not None:
            x = np.asarray(audio, np.float32)[None]
            af = av.AudioFrame.from_ndarray(x, format="fltp", layout="mono")
            af.sample_rate, af.pts = sample_rate, 0
            for p in a_s.encode(af):
                c.mux(p)
            for p in a_s.encode():
                c.mux(p)
    return path


def write_wav(path, samples, rate=16000):
    pcm = np.clip(np.round(np.asarray(samples) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def tone(seconds=0.4, rate=16000, hz=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def moving_frames(t=6, h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w), dtype=np.uint8)
    return np.stack([np.roll(base, i, 1) for i in range(t)])

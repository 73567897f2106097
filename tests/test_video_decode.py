"""Streaming video decoding: one colour-to-gray rule for decord and PyAV, per-frame crop/resize, bounded memory."""

import tracemalloc

import numpy as np
import pytest
import torch

from xmodal.data import av as avdata
from xmodal.data.av import AVRecord, decode_video, iter_gray_frames, rgb_to_gray
from xmodal.data.grid import pick_video_codec
from xmodal.errors import ConfigError, DataError

BACKENDS = ("decord", "pyav")


def write_rgb_video(path, frames, fps=25):
    """uint8 RGB [T, H, W, 3] → mp4 (yuv420p)."""
    import av

    t, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream(pick_video_codec(), rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.thread_count = 1
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def coloured_frames(t=10, h=48, w=64, seed=0):
    """Saturated colour bars, white, yellow and a noise strip, shifting by one pixel per frame."""
    rng = np.random.default_rng(seed)
    out = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 4] = (255, 0, 0)
        img[:, w // 4: w // 2] = (0, 255, 0)
        img[:, w // 2: 3 * w // 4] = (0, 0, 255)
        img[:, 3 * w // 4:] = rng.integers(0, 256, (h, w - 3 * w // 4, 3))
        img[: h // 4] = (255, 255, 0)
        img[h // 4: h // 2, : w // 4] = (255, 255, 255)
        out[i] = np.roll(img, i, 1)
    return out


@pytest.fixture(scope="module")
def colour_clip(tmp_path_factory):
    frames = coloured_frames()
    return write_rgb_video(tmp_path_factory.mktemp("vid") / "colour.mp4", frames), frames


def test_backends_agree_within_one_grey_level_on_colour(colour_clip):
    path, _ = colour_clip
    a, b = (decode_video(path, backend) for backend in BACKENDS)
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (10, 48, 64)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_gray_is_bt601_luma_of_the_colours(colour_clip):
    path, frames = colour_clip
    gray = decode_video(path, "pyav")
    # the middle of solid bars in frame 0: red, green, blue, and the white patch (lossy codec, 4:2:0 chroma)
    expect = {(36, 6): 76, (36, 22): 150, (36, 38): 29, (18, 6): 255}
    for (y, x), level in expect.items():
        assert abs(int(gray[0, y, x]) - level) <= 4, (y, x, gray[0, y, x])
    assert rgb_to_gray(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)).tolist() == [
        76, 150, 29, 255]


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_and_resize_per_frame(colour_clip, backend):
    path, _ = colour_clip
    full = decode_video(path, backend)
    crop = decode_video(path, backend, crop=(8, 12, 20, 30))
    assert np.array_equal(crop, full[:, 8:28, 12:42])
    small = decode_video(path, backend, resize=(24, 32))
    whole = torch.nn.functional.interpolate(torch.from_numpy(full).float()[:, None], size=(24, 32), mode="bilinear",
                                            align_corners=False, antialias=True)[:, 0]
    assert small.shape == (10, 24, 32) and small.dtype == np.uint8
    assert (torch.from_numpy(small).float() - whole).abs().max() <= 0.5 + 1e-4
    assert decode_video(path, backend, crop=(0, 0, 48, 48), resize=16).shape == (10, 16, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_is_one_frame_plus_the_output(tmp_path, backend):
    t, h, w = 30, 144, 176
    path = write_rgb_video(tmp_path / "long.mp4", coloured_frames(t, h, w, seed=1))
    tracemalloc.start()
    try:
        out = decode_video(path, backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rgb_frame = h * w * 3
    assert out.shape == (t, h, w)
    # a whole-clip RGB array alone would be t x rgb_frame; float32 four times that
    assert peak - out.nbytes < 5 * rgb_frame, (peak, out.nbytes)


def test_output_grows_when_the_container_under_reports_its_length(colour_clip, monkeypatch):
    path, _ = colour_clip
    expected = decode_video(path, "pyav")
    real = avdata._RGB_READERS["pyav"]

    def lying(p, threads):
        _, frames = real(p, threads)
        return 1, frames

    monkeypatch.setitem(avdata._RGB_READERS, "pyav", lying)
    assert np.array_equal(decode_video(path, "pyav"), expected)


def test_bad_crop_box_and_backend_are_named(colour_clip):
    path, _ = colour_clip
    with pytest.raises(DataError, match=r"colour\.mp4.*crop box.*48x64"):
        decode_video(path, "decord", crop=(40, 0, 20, 20))
    with pytest.raises(ConfigError, match="opencv"):
        iter_gray_frames(path, "opencv")
    with pytest.raises(ConfigError, match="resize"):
        decode_video(path, "pyav", resize=0)


def test_dataset_loader_resizes_while_decoding(colour_clip, monkeypatch):
    path, _ = colour_clip
    seen = []
    real = avdata.decode_video

    def spy(p, backend="decord", num_threads=1, **options):
        seen.append(options)
        return real(p, backend, num_threads, **options)

    monkeypatch.setattr(avdata, "decode_video", spy)
    frames = avdata._load_frames(AVRecord(id="c", video=path), "decord", resize=32)
    assert frames.shape == (10, 32, 32) and seen == [{"resize": 32}]

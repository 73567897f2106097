"""Mouth crops from landmarks: a synthetic face with known landmarks, moving and rotating."""

import pickle

import numpy as np
import pytest
from _media import tone, write_mp4, write_wav

from xmodal.cli import main
from xmodal.data import mouth as mouthmod
from xmodal.data.av import decode_video, load_audio
from xmodal.data.mouth import (
    LANDMARK_SCHEMES,
    MouthCropConfig,
    crop_mouths,
    fill_missing,
    load_landmarks,
    prepare_transforms,
    similarity_transform,
    write_mouth_clip,
)
from xmodal.errors import ConfigError, DataError

MOUTH_LEVEL, FACE_LEVEL, BACKGROUND = 230, 120, 60
MOUTH_CENTRE, MOUTH_HALF = (128.0, 190.0), (28.0, 10.0)  # in the reference face (256 x 256)


def canonical(scheme="ibug68"):
    """Landmarks of the synthetic face in reference coordinates: the scheme's stable points where the reference
    says, the mouth points on the drawn mouth's ellipse, everything else somewhere on the face."""
    s = LANDMARK_SCHEMES.get(scheme)
    rng = np.random.default_rng(0)
    p = np.c_[rng.uniform(60, 196, s.points), rng.uniform(60, 220, s.points)]
    for i, xy in zip(s.stable, s.reference):
        p[i] = xy
    (mx, my), (hx, hy) = MOUTH_CENTRE, MOUTH_HALF
    if scheme == "ibug68":  # outer lip 48-59 from the left corner, inner lip 60-67
        for first, n, scale in ((48, 12, 1.0), (60, 8, 0.6)):
            t = np.linspace(0, 2 * np.pi, n, endpoint=False)
            p[first:first + n] = np.c_[mx - scale * hx * np.cos(t), my - scale * hy * np.sin(t)]
    elif scheme == "mediapipe478":  # lip top/bottom, inner top/bottom, corners, inner corners
        for i, (dx, dy) in zip((0, 17, 13, 14, 61, 291, 78, 308),
                               ((0, -hy), (0, hy), (0, -4), (0, 4), (-hx, 0), (hx, 0), (-18, 0), (18, 0))):
            p[i] = (mx + dx, my + dy)
    assert np.allclose(p[list(s.mouth)].mean(0), MOUTH_CENTRE)
    return p


def similarity(scale, angle, tx, ty):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def render(a, h=160, w=192):
    """The face drawn through the similarity `a` (reference → image): background, face oval, bright mouth."""
    ys, xs = np.mgrid[0:h, 0:w].astype(float)
    inv = np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2]
    cx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    cy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    img = np.full((h, w), BACKGROUND, np.uint8)
    img[((cx - 128) / 100) ** 2 + ((cy - 150) / 120) ** 2 <= 1] = FACE_LEVEL
    (mx, my), (hx, hy) = MOUTH_CENTRE, MOUTH_HALF
    img[((cx - mx) / hx) ** 2 + ((cy - my) / hy) ** 2 <= 1] = MOUTH_LEVEL
    return img


def moving_face(t=10, scheme="ibug68"):
    """Frames and exact landmarks of a face that drifts, grows and turns over the clip."""
    can = canonical(scheme)
    frames, lms = [], []
    for i in range(t):
        a = similarity(0.55 + 0.015 * i, -0.15 + 0.03 * i, 0.0, 0.0)
        a[:, 2] = np.array([90.0 + 2.0 * i, 75.0 + 1.5 * i]) - a[:, :2] @ np.array([128.0, 150.0])  # face centre
        frames.append(render(a))
        lms.append(can @ a[:, :2].T + a[:, 2])
    return np.stack(frames), lms


def assert_on_mouth(crop, size=96, band=(4, 18)):
    c, (bh, bw) = size // 2, band
    band = crop[c - bh:c + bh, c - bw:c + bw]
    assert band.min() > MOUTH_LEVEL - 30, band.min()  # the mouth fills the centre
    assert crop[: c - 20].max() < MOUTH_LEVEL - 60 and crop[c + 20:].max() < MOUTH_LEVEL - 60  # above/below: face


def bright_centroid(crop):
    ys, xs = np.nonzero(crop > (MOUTH_LEVEL + FACE_LEVEL) / 2)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("scheme", ["ibug68", "mediapipe478", "mediapipe4"])
def test_crops_land_on_the_mouth_of_a_moving_face(scheme):
    frames, lms = moving_face(scheme=scheme)
    cfg = MouthCropConfig(window=1)
    crops = list(crop_mouths(frames, prepare_transforms(lms, cfg), cfg))
    assert len(crops) == len(frames) and crops[0].shape == (96, 96) and crops[0].dtype == np.uint8
    for crop in crops:
        assert_on_mouth(crop)
        assert np.abs(bright_centroid(crop) - 47.5).max() < 1.0


def test_wrong_landmarks_miss_the_mouth():
    """The pixel check can fail: landmarks shifted by a face-width put the crop off the mouth."""
    frames, lms = moving_face()
    cfg = MouthCropConfig(window=1)
    shifted = [lm + np.array([0.0, -60.0]) for lm in lms]
    crop = next(crop_mouths(frames, prepare_transforms(shifted, cfg), cfg))
    with pytest.raises(AssertionError):
        assert_on_mouth(crop)


def test_crops_are_stable_under_landmark_jitter():
    a = similarity(0.6, 0.1, 50, 10)
    frame = render(a)
    exact = canonical() @ a[:, :2].T + a[:, 2]
    rng = np.random.default_rng(1)
    jittered = [exact + rng.normal(0, 2.0, exact.shape) for _ in range(40)]
    frames = [frame] * len(jittered)

    def centroids(window):
        cfg = MouthCropConfig(window=window)
        crops = crop_mouths(frames, prepare_transforms(jittered, cfg), cfg)
        return np.stack([bright_centroid(c) for c in crops])[6:-6]  # frames with the whole window

    smoothed, raw = centroids(12), centroids(1)
    assert smoothed.std(0).max() < 0.3 and raw.std(0).max() > 2 * smoothed.std(0).max(), (smoothed, raw)
    assert np.abs(smoothed - 47.5).max() < 1.0  # and still centred on the mouth


def test_missing_frames_are_interpolated_and_too_many_refused():
    frames, lms = moving_face()
    gaps = list(lms)
    gaps[0] = gaps[4] = gaps[5] = None
    filled = fill_missing(gaps, 0.5, "clip-a")
    assert np.allclose(filled[0], lms[1])  # held at the start
    assert np.allclose(filled[4], lms[3] + (lms[6] - lms[3]) / 3)  # linear between the neighbours
    cfg = MouthCropConfig(window=1)
    for crop in crop_mouths(frames, prepare_transforms(gaps, cfg, "clip-a"), cfg):
        assert_on_mouth(crop, band=(3, 12))  # filled frames follow the face only approximately
    mostly = [None] * 6 + list(lms[6:])
    with pytest.raises(DataError, match=r"clip-b: 6 of 10 frames have no landmarks.*max_missing=0\.5; refused"):
        prepare_transforms(mostly, MouthCropConfig(), "clip-b")
    with pytest.raises(DataError, match="clip-c: no frame has landmarks"):
        prepare_transforms([None] * 3, MouthCropConfig(), "clip-c")


def test_similarity_transform_recovers_a_known_one():
    src = np.random.default_rng(0).uniform(0, 100, (8, 2))
    a = similarity(1.7, 0.6, -12.0, 30.0)
    assert np.allclose(similarity_transform(src, src @ a[:, :2].T + a[:, 2]), a)


def test_config_and_scheme_errors():
    with pytest.raises(ConfigError, match="even"):
        MouthCropConfig(crop_size=95)
    with pytest.raises(DataError, match="no landmark scheme has 5 points"):
        prepare_transforms([np.zeros((5, 2))], MouthCropConfig())
    with pytest.raises(DataError, match="'ibug68' has 68 points, the landmarks have 4"):
        prepare_transforms([np.zeros((4, 2))], MouthCropConfig(scheme="ibug68"))


# ---------------------------------------------------------------------------------------------- files


def test_landmark_files(tmp_path):
    _, lms = moving_face(t=3)
    pkl = tmp_path / "a.pkl"
    pkl.write_bytes(pickle.dumps([lms[0], None, lms[2].astype(np.float32)]))  # as auto_avsr writes them
    got = load_landmarks(pkl)
    assert got[1] is None and np.allclose(got[0], lms[0]) and np.allclose(got[2], lms[2], atol=1e-4)
    arr = np.stack(lms)
    arr[1] = np.nan
    np.save(tmp_path / "b.npy", arr)
    got = load_landmarks(tmp_path / "b.npy")
    assert got[1] is None and np.allclose(got[2], lms[2])


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/xmodal-should-not-exist", "w"))


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([_Boom()]))
    with pytest.raises(DataError, match=r"evil\.pkl.*refusing to load .*open"):
        load_landmarks(evil)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps([np.zeros((68, 3))]))
    with pytest.raises(DataError, match=r"bad\.pkl: frame 0 has landmarks of shape \[68, 3\]"):
        load_landmarks(bad)


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("face")
    frames, lms = moving_face()
    audio = tone(seconds=len(frames) / 25)
    return write_mp4(d / "face.mp4", frames, audio=audio), lms


def test_written_clip_keeps_the_audio_and_lands_on_the_mouth(face_clip, tmp_path):
    video, lms = face_clip
    out = tmp_path / "crops" / "face.mp4"
    result = write_mouth_clip(video, lms, out, MouthCropConfig(window=3), clip="spk/face")
    assert result.frames == 10 and result.audio
    crops = decode_video(out, "pyav")
    assert crops.shape == (10, 96, 96)
    for crop in crops:
        assert_on_mouth(crop)
    assert np.array_equal(load_audio(out, 16000).numpy(), load_audio(video, 16000).numpy())  # copied, not re-encoded
    assert sorted(p.name for p in out.parent.iterdir()) == ["face.mp4"]


@pytest.mark.parametrize("frames", [8, 12])
def test_mismatched_frame_counts_are_refused_by_name(face_clip, tmp_path, frames):
    video, lms = face_clip
    lms = (lms + lms)[:frames]
    out = tmp_path / "face.mp4"
    with pytest.raises(DataError, match=rf"spk/face: the video has 10 frames but the landmarks have {frames}"):
        write_mouth_clip(video, lms, out, clip="spk/face")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_mismatch_found_while_streaming_when_the_container_has_no_count(face_clip, tmp_path, monkeypatch):
    video, lms = face_clip
    cfg = MouthCropConfig()
    with pytest.raises(DataError, match="more frames than the 9 frames of landmarks"):
        list(crop_mouths(decode_video(video, "pyav"), prepare_transforms(lms[:9], cfg), cfg, "spk/face"))


# ---------------------------------------------------------------------------------------------- command


def test_command_crops_a_tree_and_refuses_bad_clips_by_name(face_clip, tmp_path, monkeypatch, capsys):
    video, lms = face_clip
    src, marks, out = tmp_path / "faces", tmp_path / "landmarks", tmp_path / "mouths"
    for name in ("00001", "00002", "00003"):
        (src / "trainval" / "spk").mkdir(parents=True, exist_ok=True)
        (src / "trainval" / "spk" / f"{name}.mp4").write_bytes(video.read_bytes())
        (marks / "trainval" / "spk").mkdir(parents=True, exist_ok=True)
    (src / "trainval" / "spk" / "00001.txt").write_text("Text:  HELLO\n")
    write_wav(src / "trainval" / "spk" / "00001.wav", tone())
    (marks / "trainval" / "spk" / "00001.pkl").write_bytes(pickle.dumps(list(lms)))
    (marks / "trainval" / "spk" / "00002.pkl").write_bytes(pickle.dumps(list(lms[:7])))  # wrong clip
    argv = ["data", "mouth-crops", str(src), "--landmarks", str(marks), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 clips written, 0 already done, 2 refused" in text
    assert "refused trainval/spk/00002.mp4: trainval/spk/00002.mp4: the video has 10 frames but the landmarks " \
           "have 7" in text
    assert "refused trainval/spk/00003.mp4: no landmarks file" in text
    done = out / "trainval" / "spk"
    assert sorted(p.name for p in done.iterdir()) == ["00001.mp4", "00001.txt", "00001.wav"]
    assert_on_mouth(decode_video(done / "00001.mp4", "pyav")[5])
    import json

    report = json.loads((out / "mouth_crops.json").read_text())
    assert report["written"] == 1 and sorted(report["refused"]) == ["trainval/spk/00002.mp4", "trainval/spk/00003.mp4"]

    # the detector slot fills in clips without a landmarks file; finished clips are kept
    calls = []

    def fake_detector():
        def detect(rgb):
            calls.append(rgb.shape)
            return lms[(len(calls) - 1) % len(lms)]
        return detect

    monkeypatch.setitem(mouthmod.LANDMARK_DETECTORS._items, "fake", fake_detector)
    (marks / "trainval" / "spk" / "00002.pkl").unlink()
    assert main(argv + ["--detector", "fake"]) == 0
    assert "2 clips written, 1 already done, 0 refused" in capsys.readouterr().out
    assert calls[0] == (160, 192, 3) and len(calls) == 20
    assert main(["data", "mouth-crops", str(src), "--out", str(out)]) == 2  # neither landmarks nor detector

"""Embedding cache: fp16 memory-mapped entries, atomic writes, invalidation when model or data change."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xmodal.errors import DataError
from xmodal.tasks.retrieval import EmbeddingStore, cache_key, data_fingerprint, encode_image_text
from xmodal.tasks.retrieval import encode as encode_mod


def tiny_loaded_clip(seed: int = 0):
    """A CLIP small enough for tests, with its eval transform and tokenizer."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from xmodal.fingerprint import model_fingerprint

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    return SimpleNamespace(
        model=model,
        preprocess=open_clip.image_transform(32, is_train=False),
        tokenizer=lambda texts: open_clip.tokenize(texts, context_length=16),
        name="tiny",
        pretrained=None,
        fingerprint=model_fingerprint(model, {"image_size": 32}),
    )


def write_dataset(root, num_images: int = 5, name: str = "data.csv"):
    """PNG squares of different colours and a CSV with 2–3 captions per image (one row per caption)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for i in range(num_images):
        Image.new("RGB", (32, 32), (40 * i % 256, 255 - 30 * i, 90)).save(root / f"img{i}.png")
        for j in range(2 + i % 2):
            rows.append(f"img{i}.png,a photo of thing {i} number {j}")
    path = root / name
    path.write_text("\n".join(rows) + "\n")
    return path


def test_write_and_load_roundtrip(tmp_path):
    store = EmbeddingStore(tmp_path / "cache")
    image = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    text = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    mapping = np.array([0, 0, 1, 2, 3, 3])
    with store.writer("k1", 4, 6, mapping, {"slot": "a"}) as w:
        w.write("image", 0, image[:3])
        w.write("image", 3, image[3:])
        w.write("text", 0, text)
    entry = store.load("k1")
    assert isinstance(entry.image, np.memmap) and entry.image.dtype == np.float16
    np.testing.assert_allclose(entry.image, image, atol=2e-3)
    np.testing.assert_allclose(entry.text, text, atol=2e-3)
    np.testing.assert_array_equal(entry.text_to_image, mapping)
    assert entry.meta["shapes"] == {"image": [4, 8], "text": [6, 8]}
    assert store.load("other") is None


def test_interrupted_write_leaves_nothing(tmp_path):
    store = EmbeddingStore(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt), store.writer("k", 2, 2, np.array([0, 1]), {}) as w:
        w.write("image", 0, np.ones((2, 4)))
        raise KeyboardInterrupt
    assert os.listdir(tmp_path / "cache") == []
    with pytest.raises(RuntimeError, match="incomplete"), store.writer("k", 2, 2, np.array([0, 1]), {}) as w:
        w.write("image", 0, np.ones((2, 4)))  # texts never written
    assert store.load("k") is None and os.listdir(tmp_path / "cache") == []


def test_bad_values_are_refused(tmp_path):
    store = EmbeddingStore(tmp_path)
    bad = np.ones((3, 4))
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="text embedding 6"), store.writer("k", 1, 9, np.zeros(9, int), {}) as w:
        w.write("text", 5, bad)
    with pytest.raises(DataError, match="fp16 range"), store.writer("k", 1, 1, np.zeros(1, int), {}) as w:
        w.write("image", 0, np.full((1, 4), 1e6))


def test_corrupt_entry_is_recomputed(tmp_path):
    store = EmbeddingStore(tmp_path)
    with store.writer("k", 2, 2, np.array([0, 1]), {}) as w:
        w.write("image", 0, np.ones((2, 4)))
        w.write("text", 0, np.ones((2, 4)))
    (tmp_path / "k" / "text.npy").write_bytes(b"garbage")
    assert store.load("k") is None
    assert not (tmp_path / "k").exists()


def test_key_depends_on_model_data_and_settings(tmp_path):
    data = write_dataset(tmp_path / "d")
    paths = [str(tmp_path / "d" / f"img{i}.png") for i in range(5)]
    fp = data_fingerprint(data, paths)
    base = cache_key("model-a", fp, {"normalize": True})
    assert base == cache_key("model-a", data_fingerprint(data, paths), {"normalize": True})
    assert base != cache_key("model-b", fp, {"normalize": True})
    assert base != cache_key("model-a", fp, {"normalize": False})
    data.write_text(data.read_text().replace("thing 0", "thing zero"))
    assert data_fingerprint(data, paths) != fp
    fp2 = data_fingerprint(data, paths)
    os.utime(paths[2], ns=(1, 1))  # an image changed on disk
    assert data_fingerprint(data, paths) != fp2


@pytest.fixture
def count_encodes(monkeypatch):
    calls = {"images": 0, "texts": 0}
    real_images, real_texts = encode_mod.encode_images, encode_mod.encode_texts

    def images(*a, **k):
        calls["images"] += 1
        return real_images(*a, **k)

    def texts(*a, **k):
        calls["texts"] += 1
        return real_texts(*a, **k)

    monkeypatch.setattr(encode_mod, "encode_images", images)
    monkeypatch.setattr(encode_mod, "encode_texts", texts)
    return calls


def test_encode_uses_and_invalidates_cache(tmp_path, count_encodes):
    data = write_dataset(tmp_path / "d")
    cache = tmp_path / "cache"
    clip = tiny_loaded_clip()
    kw = dict(cache_dir=cache, batch_size=2, device="cpu", progress=False)
    first = encode_image_text(clip, data, **kw)
    assert not first.from_cache and count_encodes["images"] == 1
    assert first.image.shape == (5, 32) and first.text.shape == (12, 32)
    np.testing.assert_array_equal(first.text_to_image, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    np.testing.assert_allclose(np.linalg.norm(first.image.astype(np.float32), axis=1), 1, atol=2e-3)

    # the cached embeddings are the model's: compare one image and caption with a direct encode
    with torch.no_grad():
        from PIL import Image

        x = clip.preprocess(Image.open(tmp_path / "d" / "img3.png").convert("RGB"))[None]
        direct = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1)[0].numpy()
        tokens = clip.tokenizer(["a photo of thing 1 number 2"])
        t = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(first.image[3].astype(np.float32), direct, atol=2e-3)
    np.testing.assert_allclose(first.text[4].astype(np.float32), t[0].numpy(), atol=2e-3)

    again = encode_image_text(clip, data, **kw)
    assert again.from_cache and count_encodes["images"] == 1
    np.testing.assert_array_equal(again.image, first.image)

    data.write_text(data.read_text().replace("number 1", "number one"))  # data changed
    changed = encode_image_text(clip, data, **kw)
    assert not changed.from_cache and count_encodes["images"] == 2
    assert not np.array_equal(changed.text, first.text)

    other = tiny_loaded_clip(seed=1)  # weights changed
    other.name = clip.name
    encode_image_text(other, data, **kw)
    assert count_encodes["images"] == 3
    # the stale entries for the same data file and model name were removed
    assert len(EmbeddingStore(cache).entries()) == 1


def test_encode_without_cache(tmp_path, count_encodes):
    data = write_dataset(tmp_path / "d", num_images=3)
    out = encode_image_text(tiny_loaded_clip(), data, cache_dir=None, device="cpu", progress=False)
    assert out.image.dtype == np.float16 and out.text.shape == (7, 32) and not out.from_cache
    encode_image_text(tiny_loaded_clip(), data, cache_dir=None, device="cpu", progress=False)
    assert count_encodes["images"] == 2


def test_missing_image_and_empty_data(tmp_path):
    data = write_dataset(tmp_path / "d")
    os.remove(tmp_path / "d" / "img2.png")
    with pytest.raises(DataError, match=r"missing .*data.csv:\d+: .*img2.png"):
        encode_image_text(tiny_loaded_clip(), data, cache_dir=tmp_path / "c", device="cpu", progress=False)
    empty = tmp_path / "empty.csv"
    empty.write_text("filepath,title\n")
    with pytest.raises(DataError, match="no records"):
        encode_image_text(tiny_loaded_clip(), empty, cache_dir=tmp_path / "c", device="cpu", progress=False)


# ---------------------------------------------------------------- one writer per entry, no temp folders pile up

KILLED_WRITER = '''
import pathlib, sys, time

import numpy as np

from xmodal.tasks.retrieval import EmbeddingStore

root, ready = sys.argv[1], pathlib.Path(sys.argv[2])
with EmbeddingStore(root).writer("victim", 2, 2, np.array([0, 1]), {}) as w:
    w.write("image", 0, np.ones((2, 4)))
    ready.touch()
    time.sleep(600)  # killed here, mid-write
'''


def test_temp_folders_of_killed_writers_are_removed(tmp_path):
    """A writer killed mid-write (SIGKILL: no cleanup runs) leaves its temp folder; the next writer removes it."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "cache"
    script, ready = tmp_path / "writer.py", tmp_path / "ready"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(ready)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):  # up to 2 min for the child to start and begin writing
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), proc.communicate()[1]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in root.iterdir() if p.name.startswith(".victim.")]
    assert any(name.endswith(".tmp") for name in left)  # what the kill left behind
    for i in range(11):  # and what earlier kills left (ten temp folders, a half-removed entry)
        (root / f".k{i}.abc{i}.tmp").mkdir()
    (root / ".k3.x.trash").mkdir()
    store = EmbeddingStore(root)
    with store.writer("fresh", 1, 1, np.zeros(1, int), {}) as w:
        w.write("image", 0, np.ones((1, 4)))
        w.write("text", 0, np.ones((1, 4)))
    assert sorted(p.name for p in root.iterdir()) == ["fresh"]
    assert store.load("fresh") is not None


def test_an_entry_being_written_is_locked(tmp_path):
    """A second writer of the same entry is refused, naming the writer's process; its temp folder is kept."""
    from xmodal.lock import FolderLock, LockedError

    root = tmp_path / "cache"
    root.mkdir()
    busy = root / ".k.live.tmp"
    busy.mkdir()
    store = EmbeddingStore(root)
    with FolderLock(root, "embedding-store entry", name=".k.lock"):  # another writer holds entry k
        with pytest.raises(LockedError, match=f"entry k in {root} is being written by process {os.getpid()}"):
            with store.writer("k", 1, 1, np.zeros(1, int), {}):
                pass
        with store.writer("other", 1, 1, np.zeros(1, int), {}) as w:  # other entries are free
            w.write("image", 0, np.ones((1, 4)))
            w.write("text", 0, np.ones((1, 4)))
        assert busy.is_dir()  # the live writer's temp folder is left alone
    with store.writer("k", 1, 1, np.zeros(1, int), {}) as w:
        w.write("image", 0, np.ones((1, 4)))
        w.write("text", 0, np.ones((1, 4)))
    assert not busy.exists() and sorted(p.name for p in root.iterdir()) == ["k", "other"]

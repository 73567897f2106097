"""Teacher cache: variable-length round trip, damage detection, resumable builds, the distiller and the CLI."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
from _pairs import PairData
from torch import nn
from torch.utils.data import Dataset

from xmodal.cli import main as cli_main
from xmodal.config import JOBS, Job, TrainConfig
from xmodal.engine import CACHE_SOURCES, CacheSource, Distiller, TeacherCache, build_cache
from xmodal.errors import CheckpointError, DataError
from xmodal.features import Features
from xmodal.losses import build_losses

FP = "teacher-fp-1"


class SeqData(Dataset):
    """Samples with two augmentations each, a feature vector and a sequence length from 1 to 9."""

    def __init__(self, n: int = 23, scale: float = 1.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g) * scale
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"id": f"v{i // 2}", "aug_index": i % 2, "x": self.x[i], "length": 1 + (i * 7) % 9}


def seq_teacher(batch) -> dict[str, Features]:
    """Deterministic per-sample outputs: tokens and per-step logits of each sample's length, a hole in some masks."""
    x, lengths = batch["x"].float(), batch["length"]
    t = int(lengths.max())
    steps = torch.arange(1, t + 1, dtype=torch.float32)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    hole = (lengths > 3) & (batch["aug_index"] == 1)
    if t > 1:
        mask[hole, 1] = False  # a masked position inside a sequence must survive the round trip
    tokens = x[:, None, :4] * steps[None, :, None] * mask[..., None]
    audio_logits = x[:, None, :5] - steps[None, :, None]
    return {
        "audio": Features(pooled=x[:, :3] * 2, tokens=tokens, mask=mask, logits=audio_logits),
        "image": Features(pooled=x.flip(1), logits=x[:, :2] - 1),
        "ctc": Features(pooled=x[:, :1], logits=x[:, None, :3].expand(-1, 3, -1) * 0.5),
    }


def reference(ds: SeqData, index: int) -> dict[str, Features]:
    item = ds[index]
    batch = {"x": item["x"][None], "length": torch.tensor([item["length"]]),
             "aug_index": torch.tensor([item["aug_index"]])}
    return seq_teacher(batch)


def check_rows(cache: TeacherCache, ds: SeqData, indices: list[int], cast) -> None:
    """Lookup of samples in any order equals each sample's own teacher output (padded to the batch max)."""
    items = [ds[i] for i in indices]
    out = cache.lookup([it["id"] for it in items], [it["aug_index"] for it in items])
    assert set(out) == {"audio", "image", "ctc"}
    tmax = max(it["length"] for it in items)
    assert out["audio"].tokens.shape == (len(items), tmax, 4) and out["audio"].mask.shape == (len(items), tmax)
    for row, i in enumerate(indices):
        ref = reference(ds, i)
        length = ds[i]["length"]
        a = out["audio"]
        assert torch.equal(a.pooled[row], cast(ref["audio"].pooled[0]))
        assert torch.equal(a.mask[row, :length], ref["audio"].mask[0])
        assert not a.mask[row, length:].any() and not a.tokens[row, length:].any()
        real = ref["audio"].mask[0]
        assert torch.equal(a.tokens[row, :length][real], cast(ref["audio"].tokens[0][real]))
        assert torch.equal(a.logits[row, :length], cast(ref["audio"].logits[0]))
        assert torch.equal(out["image"].pooled[row], cast(ref["image"].pooled[0]))
        assert torch.equal(out["image"].logits[row], cast(ref["image"].logits[0]))
        assert out["ctc"].tokens is None and torch.equal(out["ctc"].logits[row], cast(ref["ctc"].logits[0]))


def collate(items):
    from xmodal.engine import collate_samples

    return collate_samples(items)


@pytest.fixture
def built(tmp_path):
    ds = SeqData()
    path = build_cache(seq_teacher, ds, tmp_path / "cache", FP, batch_size=4, shard_size=5, progress=False)
    return ds, path


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_of_variable_length_sequences(tmp_path, dtype):
    ds = SeqData()
    path = build_cache(seq_teacher, ds, tmp_path, FP, batch_size=4, shard_size=5, dtype=dtype, progress=False)
    cache = TeacherCache(path, fingerprint=FP)
    assert len(cache) == len(ds) and cache.modalities == ["audio", "ctc", "image"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 5 and manifest["fingerprint"] == FP
    assert manifest["fields"]["audio.tokens"] == {"kind": "flat", "shape": [4], "dtype": dtype}
    cast = (lambda t: t.half().float()) if dtype == "float16" else (lambda t: t)
    order = list(range(len(ds)))
    random.Random(0).shuffle(order)
    check_rows(cache, ds, order[:9], cast)  # spans several shards, out of order
    check_rows(cache, ds, [3], cast)
    check_rows(cache, ds, order, cast)
    assert ("v1", 1) in cache and ("v1", 5) not in cache
    # Flat storage: no padding on disk (Σ lengths positions, not rows × max length).
    total = sum(len(json.loads((path / e["name"] / "ids.json").read_text())) for e in manifest["shards"])
    itemsize = 2 if dtype == "float16" else 4
    positions = sum(e["files"]["audio.tokens.bin"]["bytes"] for e in manifest["shards"]) // (4 * itemsize)
    assert total == len(ds) and positions == sum(ds[i]["length"] for i in range(len(ds)))


def test_batch_call_and_missing_ids(built):
    ds, path = built
    cache = TeacherCache(path)
    batch = collate([ds[4], ds[7]])
    out = cache(batch)
    assert torch.equal(out["image"].pooled, cache.lookup(["v2", "v3"], [0, 1])["image"].pooled)
    with pytest.raises(DataError, match="'nope' \\(augmentation 0\\)"):
        cache.lookup(["v1", "nope"])
    with pytest.raises(DataError, match="batch\\['ids'\\]"):
        cache({"x": torch.zeros(1)})


def test_other_teacher_or_plan_is_refused(built, tmp_path):
    ds, path = built
    with pytest.raises(CheckpointError) as info:
        TeacherCache(path, fingerprint="teacher-fp-2")
    assert FP in str(info.value) and "teacher-fp-2" in str(info.value)
    with pytest.raises(CheckpointError, match="teacher-fp-2"):
        build_cache(seq_teacher, ds, path, "teacher-fp-2", shard_size=5, progress=False)
    with pytest.raises(CheckpointError, match="shard_size: 5 → 6"):
        build_cache(seq_teacher, ds, path, FP, shard_size=6, progress=False)
    with pytest.raises(CheckpointError, match="not a teacher cache"):
        TeacherCache(tmp_path / "nowhere")


@pytest.mark.parametrize("change", ["truncate", "extend"])
def test_truncated_shard_is_named(built, change):
    _, path = built
    victim = path / "shard_00001" / "audio.tokens.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[:-2] if change == "truncate" else data + b"\0\0")
    with pytest.raises(CheckpointError, match="shard_00001 is truncated or damaged: audio.tokens.bin"):
        TeacherCache(path, verify="size")


def test_corrupt_shard_is_named(built):
    _, path = built
    victim = path / "shard_00002" / "image.pooled.bin"
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard_00002 is corrupt: checksum of image.pooled.bin"):
        TeacherCache(path)
    TeacherCache(path, verify="size")  # size-only checks cannot see a flipped byte: the documented trade-off


def test_interrupted_build_resumes_without_redoing_finished_shards(tmp_path):
    ds = SeqData()
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 6:  # 2 batches per shard of 5 with batch 4: dies inside the third shard
            raise RuntimeError("teacher crashed")
        return seq_teacher(batch)

    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_cache(flaky, ds, root, FP, batch_size=4, shard_size=5, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [e["name"] for e in manifest["shards"]] == ["shard_00000", "shard_00001"] and not manifest["complete"]
    with pytest.raises(CheckpointError, match="incomplete \\(2 of 5 shards\\)"):
        TeacherCache(root)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("shard_0000[01]/*")}
    (root / ".shard_00002.tmp").mkdir()  # what a kill during a shard write leaves
    (root / ".shard_00002.tmp" / "audio.pooled.bin").write_bytes(b"partial")

    calls["n"] = 100
    build_cache(flaky, ds, root, FP, batch_size=4, shard_size=5, progress=False)
    assert calls["n"] - 100 == 5  # only shards 2 and 3 (2 batches each) and 4 (3 samples, 1 batch) ran
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == s for p, s in stamps.items())
    assert not (root / ".shard_00002.tmp").exists()

    clean = build_cache(seq_teacher, ds, tmp_path / "clean", FP, batch_size=4, shard_size=5, progress=False)
    resumed, fresh = TeacherCache(root), TeacherCache(clean)
    ids = [ds[i]["id"] for i in range(len(ds))]
    augs = [ds[i]["aug_index"] for i in range(len(ds))]
    a, b = resumed.lookup(ids, augs), fresh.lookup(ids, augs)
    for m in a:
        for field in ("pooled", "tokens", "mask", "logits"):
            x, y = getattr(a[m], field), getattr(b[m], field)
            assert (x is None and y is None) or torch.equal(x, y)


def test_values_outside_float16_are_refused(tmp_path):
    with pytest.raises(DataError, match="float16 range.*float32"):
        build_cache(seq_teacher, SeqData(scale=1e6), tmp_path, FP, batch_size=4, shard_size=5, progress=False)


def test_duplicate_ids_are_refused(tmp_path):
    class Dupes(SeqData):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "aug_index": 0}

    with pytest.raises(DataError, match="appears twice"):
        build_cache(seq_teacher, Dupes(), tmp_path, FP, batch_size=4, shard_size=5, progress=False)


# ---------------------------------------------------------------- the distiller reads the cache


class TwoTower(nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.image, self.text = nn.Linear(12, width), nn.Linear(10, width)

    def forward(self, batch):
        return {"image": Features(self.image(batch["image"])), "text": Features(self.text(batch["text"]))}


def test_distiller_with_cache_matches_online_teacher(tmp_path):
    teacher = TwoTower(24, seed=1).eval()
    cache = build_cache(teacher, PairData(32), tmp_path / "cache", FP, batch_size=5, shard_size=10, dtype="float32",
                        progress=False)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1, device="cpu", log_every=2)
    losses = [{"name": "affinity"}, {"name": "feature_cosine"}]

    def run(folder, t):
        student = TwoTower(24, seed=2)
        Distiller(student, build_losses(losses), PairData(32), cfg, folder, teacher=t, teacher_fingerprint=FP,
                  progress=False).fit()
        return student.state_dict()

    online, cached = run(tmp_path / "online", teacher), run(tmp_path / "cached", cache)
    for k in online:
        torch.testing.assert_close(cached[k], online[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="teacher-fp-2"):
        Distiller(TwoTower(24, 2), build_losses(losses), PairData(32), cfg, tmp_path / "x", teacher=cache,
                  teacher_fingerprint="teacher-fp-2")


# ---------------------------------------------------------------- xmodal cache CONFIG


@dataclass
class CacheJobConfig:
    teacher_cache: str | None = None
    samples: int = 23


def test_cli_builds_the_cache_of_a_job(tmp_path, capsys):
    JOBS.register("engine_test_cache", Job(CacheJobConfig, lambda cfg: {}), override=True)
    JOBS.register("engine_test_nocache", Job(CacheJobConfig, lambda cfg: {}), override=True)
    CACHE_SOURCES.register(
        "engine_test_cache",
        lambda cfg: CacheSource(seq_teacher, SeqData(cfg.samples), FP, batch_size=4),
        override=True,
    )
    config = tmp_path / "job.yaml"
    config.write_text(f"job: engine_test_cache\nteacher_cache: {tmp_path / 'c'}\n")
    args = ["cache", str(config), "--shard-size", "5", "--no-progress"]
    assert cli_main(args) == 0
    cache = TeacherCache(tmp_path / "c", fingerprint=FP)
    assert len(cache) == 23 and json.loads((tmp_path / "c" / "manifest.json").read_text())["meta"]["job"] == \
        "engine_test_cache"
    assert cli_main(args + ["--set", "samples=23"]) == 0  # already complete: nothing to do

    assert cli_main(["cache", str(config), "--set", "samples=11", "--no-progress"]) == 2
    assert "num_samples: 23 → 11" in capsys.readouterr().err

    other = tmp_path / "other.yaml"
    other.write_text("job: engine_test_nocache\n")
    assert cli_main(["cache", str(other), "--out", str(tmp_path / "d")]) == 2
    assert "no teacher cache source" in capsys.readouterr().err

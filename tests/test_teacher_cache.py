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


# ---------------------------------------------------------------- data identity, skipped samples, one builder


class Unreadable(SeqData):
    """SeqData whose samples 3 and 8 cannot be read (None, as `on_error: skip` gives); `sample_key` names them."""

    BAD = (3, 8)

    def sample_key(self, i: int) -> str:
        return f"v{i // 2}"

    def __getitem__(self, i: int):
        return None if i in self.BAD else super().__getitem__(i)


def test_unreadable_samples_are_skipped_recorded_and_named_on_lookup(tmp_path):
    ds = Unreadable(12)
    path = build_cache(seq_teacher, ds, tmp_path / "c", FP, batch_size=4, shard_size=5, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["skipped"] == ["v1", "v4"]
    cache = TeacherCache(path, fingerprint=FP)
    assert len(cache) == 10 and cache.skipped == {"v1", "v4"}
    check_rows(cache, SeqData(12), [0, 2, 9, 11, 4], lambda t: t.half().float())
    with pytest.raises(DataError, match="'v1' \\(augmentation 1\\) was skipped when teacher cache .* was built"):
        cache.lookup(["v0", "v1"], [0, 1])
    with pytest.raises(DataError, match="'v9' \\(augmentation 0\\) is not in teacher cache .* was not skipped"):
        cache.lookup(["v9"])

    class AllBad(SeqData):
        def __getitem__(self, i):
            return None

    with pytest.raises(DataError, match="none of the 2 samples could be read"):
        build_cache(seq_teacher, AllBad(2), tmp_path / "d", FP, progress=False)


def test_cache_refuses_data_files_changed_since_the_build(tmp_path):
    from _edits import same_size_edit

    from xmodal.fingerprint import data_identity, fingerprint

    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "u1", "transcript": "ab"}\n')
    ident = data_identity({"train": data}, vocab="ab")
    fp = fingerprint(FP, data=ident)
    path = build_cache(seq_teacher, SeqData(), tmp_path / "c", fp, shard_size=5, data=ident, progress=False)
    assert json.loads((path / "manifest.json").read_text())["data"] == ident.to_dict()
    TeacherCache(path, fingerprint=fp)
    TeacherCache(path, fingerprint=FP)  # a teacher-only fingerprint: the recorded files are still checked
    with pytest.raises(CheckpointError, match="the data differ: vocab.*xmodal cache"):
        TeacherCache(path, fingerprint=fingerprint(FP, data=data_identity({"train": data}, vocab="ba")))
    same_size_edit(data, '"ab"', '"ba"')
    for fp_now in (FP, fp):
        with pytest.raises(CheckpointError, match=f"changed since: train \\({data}\\): its content changed"):
            TeacherCache(path, fingerprint=fp_now)
    with pytest.raises(CheckpointError, match="the data differ: train"):
        build_cache(seq_teacher, SeqData(), path, fingerprint(FP, data=data_identity({"train": data}, vocab="ab")),
                    shard_size=5, progress=False)


LOCK_SCRIPT = '''
import pathlib, sys, time
from dataclasses import dataclass

import torch

from xmodal.cli import main
from xmodal.config import JOBS, Job
from xmodal.engine import CACHE_SOURCES, CacheSource
from xmodal.features import Features

started, release = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])


@dataclass
class Cfg:
    teacher_cache: str = ""


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"id": f"s{i}", "x": torch.full((3,), float(i))}


def teacher(batch):
    started.touch()
    while not release.exists():
        time.sleep(0.05)
    return {"m": Features(pooled=batch["x"])}


JOBS.register("lock_test", Job(Cfg, lambda c: {}), override=True)
CACHE_SOURCES.register("lock_test", lambda c: CacheSource(teacher, Data(), "fp", batch_size=4), override=True)
if sys.argv[4:] == ["second"]:  # start only once the first build holds the lock (imports ran meanwhile)
    while not started.exists():
        time.sleep(0.05)
sys.exit(main(["cache", sys.argv[1], "--shard-size", "4", "--no-progress"]))
'''


def test_second_cache_build_on_one_folder_is_refused_naming_the_holder(tmp_path):
    """Two real `xmodal cache` processes on one folder: the second is refused, naming the first's process id,
    and leaves nothing behind; the first finishes a complete cache."""
    import subprocess
    import sys

    script, config = tmp_path / "build.py", tmp_path / "job.yaml"
    script.write_text(LOCK_SCRIPT)
    cache = tmp_path / "cache"
    config.write_text(f"job: lock_test\nteacher_cache: {cache}\n")
    started, release = tmp_path / "started", tmp_path / "release"
    cmd = [sys.executable, str(script), str(config), str(started), str(release)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(cmd + ["second"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = second.communicate(timeout=180)
        assert second.returncode == 2, err
        assert f"teacher cache {cache} is in use by process {first.pid}" in err
        assert "Traceback" not in err
        assert not [p.name for p in cache.iterdir() if p.name.startswith((".shard", "shard"))]
    finally:
        release.touch()
        if second.poll() is None:
            second.kill()
        out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert "teacher cache ready" in out and "(8 samples)" in out
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert len(TeacherCache(cache, fingerprint="fp")) == 8


# ---------------------------------------------------------------- the jobs: data identity and sample keys

CLIP_JOB = """job: clip_distill
run_dir: {run}
data:
  root: {data}
  synthetic: {{train: 24, val: 8, test: 8, image_size: 32}}
  caption_sampling: first
  val: null
  test: null
  zeroshot: null
teacher:
{cache}{teacher}student:
  shrink: {{vision: {{layers: 1}}, text: {{layers: 1}}}}
train: {{steps: 1, batch_size: 8, warmup_steps: 0, log_every: 1, ckpt_every: 0}}
eval: {{zeroshot: false}}
"""


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def clip_teacher_folder(tmp_path):
    """A fixed tiny open_clip teacher as a local folder (what a pretrained teacher looks like to the job)."""
    from xmodal.students.clip import create_student
    from xmodal.students.export import export_open_clip

    folder = tmp_path / "teacher_open_clip"
    if not folder.is_dir():
        torch.manual_seed(0)
        export_open_clip(create_student(TINY_CLIP), TINY_CLIP, folder)
    return folder


def clip_config(tmp_path, name="job.yaml", cache=None, teacher_train=False, run="run"):
    if teacher_train:
        teacher = f"  model_cfg: {json.dumps(TINY_CLIP)}\n  train: {{steps: 1, batch_size: 8, warmup_steps: 0}}\n"
    else:
        teacher = f"  model: {clip_teacher_folder(tmp_path)}\n"
    text = CLIP_JOB.format(run=tmp_path / run, data=tmp_path / "data", cache=f"  cache: {cache}\n" if cache else "",
                           teacher=teacher)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_clip_cache_refuses_an_edited_train_file_of_the_same_size(tmp_path, capsys):
    """The CSV's content is the cache's data identity: a caption edited in place (same length, same byte size,
    same modification time) makes the training run refuse the cache instead of reading stale outputs."""
    from _edits import same_size_edit

    from xmodal.cli import main

    cache = tmp_path / "cache"
    assert main(["cache", str(clip_config(tmp_path)), "--out", str(cache), "--no-progress"]) == 0
    train = tmp_path / "data" / "train.csv"
    first_caption = train.read_text().splitlines()[1].split("\t")[-1]
    same_size_edit(train, first_caption, first_caption[::-1])
    capsys.readouterr()
    assert main(["distill", str(clip_config(tmp_path, "cached.yaml", cache=cache))]) == 2
    err = capsys.readouterr().err
    assert f"teacher cache {cache} was built from data that changed since: train ({train}" in err
    assert "xmodal cache" in err


def test_clip_cache_skips_unreadable_images_and_records_them(tmp_path, capsys):
    """With on_error: skip an unreadable image is left out of the cache (its key recorded, a lookup says it was
    skipped) instead of aborting the build."""
    from xmodal.cli import main
    from xmodal.config import load_job_config
    from xmodal.data.image_text import ImageTextDataset
    from xmodal.tasks.clip.job import resolve_data

    cfg_path = clip_config(tmp_path)
    train = resolve_data(load_job_config(cfg_path)[1].data).train  # writes the synthetic data
    base = ImageTextDataset(train, caption_sampling="first")
    broken = 5
    with open(base.records[broken].image, "wb") as f:
        f.write(b"not a png")
    cache = tmp_path / "cache"
    capsys.readouterr()
    assert main(["cache", str(cfg_path), "--out", str(cache), "--no-progress"]) == 0
    assert "(23 samples; 1 unreadable sample(s) skipped" in capsys.readouterr().out
    key = base.sample_key(broken)
    assert json.loads((cache / "manifest.json").read_text())["skipped"] == [key]
    teacher_cache = TeacherCache(cache)
    assert len(teacher_cache) == 23 and key not in teacher_cache
    with pytest.raises(DataError, match=f"'{key}' .* was skipped when teacher cache"):
        teacher_cache.lookup([key])


def test_clip_cache_rows_follow_their_image_when_the_csv_is_reordered(tmp_path):
    """Rows are keyed by sample key (the image), not by row number: the same images listed in another order get
    their own teacher outputs from the cache."""
    import random

    from xmodal.config import load_job_config
    from xmodal.data.image_text import ImageTextDataset
    from xmodal.tasks.clip.data import PairedViews, collate_skipping
    from xmodal.tasks.clip.job import cache_source

    _, cfg = load_job_config(clip_config(tmp_path))
    source = cache_source(cfg)
    cache = TeacherCache(build_cache(source.teacher, source.dataset, tmp_path / "cache", source.fingerprint,
                                     collate_fn=source.collate_fn, dtype="float32", progress=False))
    train = tmp_path / "data" / "train.csv"
    header, *rows = train.read_text().splitlines()
    images: dict[str, list[str]] = {}
    for row in rows:  # shuffle the images, each keeping its captions in order (so its first caption stays first)
        images.setdefault(row.split("\t")[0], []).append(row)
    groups = list(images.values())
    random.Random(0).shuffle(groups)
    shuffled = train.with_name("shuffled.csv")
    shuffled.write_text("\n".join([header, *(row for group in groups for row in group)]) + "\n")
    views = PairedViews(ImageTextDataset(shuffled, caption_sampling="first"), source.dataset.views)
    batch = collate_skipping([views[i] for i in range(len(views))])
    assert len(batch["ids"]) == 24
    online, cached = source.teacher(batch), cache(batch)
    for modality in ("image", "text"):
        torch.testing.assert_close(cached[modality].pooled, online[modality].pooled, rtol=1e-4, atol=1e-5)


def test_clip_trained_teacher_is_not_reused_after_a_same_size_edit(tmp_path, caplog):
    import logging

    from _edits import same_size_edit

    from xmodal.config import load_job_config
    from xmodal.tasks.clip.job import obtain_teacher, resolve_data

    _, cfg = load_job_config(clip_config(tmp_path, teacher_train=True))
    paths = resolve_data(cfg.data)
    run = tmp_path / "run"
    obtain_teacher(cfg.teacher, paths, cfg.data, run, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="xmodal"):
        obtain_teacher(cfg.teacher, paths, cfg.data, run, torch.device("cpu"))
    assert "reusing the teacher trained earlier" in caplog.text
    caption = paths.train.read_text().splitlines()[1].split("\t")[-1]
    same_size_edit(paths.train, caption, caption[::-1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xmodal"):
        obtain_teacher(cfg.teacher, paths, cfg.data, run, torch.device("cpu"))
    assert "reusing" not in caplog.text and "training" in caplog.text
    assert len(list((run / "teacher").glob("*/open_clip/open_clip_config.json"))) == 2


def lip_setup(tmp_path):
    """A three-utterance corpus, a tiny speech-recogniser teacher file and a lipread config using both."""
    import numpy as np
    import yaml

    from xmodal.data.grid import encode_video, encode_wav
    from xmodal.nn.recognizer import save_recognizer
    from xmodal.teachers.speech import SpeechRecognizer, SpeechRecognizerConfig

    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (text, frames) in enumerate([("ab", 10), ("ba", 8), ("a b", 12)]):
        (root / f"u{i}.mp4").write_bytes(encode_video(rng.integers(0, 255, (frames, 32, 32), dtype=np.uint8), 25.0)[0])
        (root / f"u{i}.wav").write_bytes(encode_wav(rng.normal(0, 0.1, frames * 640).astype(np.float32), 16000))
        lines.append(json.dumps({"id": f"u{i}", "video": f"u{i}.mp4", "audio": f"u{i}.wav", "transcript": text}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    tiny = dict(dim=16, num_layers=1, num_heads=2, ffn_dim=32, decoder_ffn_dim=32, conv_kernel=3, dropout=0.0)
    torch.manual_seed(0)
    save_recognizer(SpeechRecognizer(SpeechRecognizerConfig(n_mels=20, **tiny)), tmp_path / "teacher.pt")
    train = dict(steps=1, batch_size=3, lr=1e-3, warmup_steps=0, log_every=1, eval_every=0, ckpt_every=0)
    cfg = {"job": "lipread_distill", "run_dir": str(tmp_path / "run"),
           "data": {"root": str(root), "val": None, "test": None,
                    "video": {"crop_size": 24, "hflip_prob": 0.0, "time_masks": 0}, "audio": {"n_mels": 20}},
           "teacher": {"kind": "speech", "path": str(tmp_path / "teacher.pt"), "cache": str(tmp_path / "cache")},
           "student": {"width_mult": 0.0625, "blocks": [1, 1, 1, 1], "encoder": "transformer", **tiny},
           "losses": [{"name": "ctc", "weight": 0.5}, {"name": "libs", "weight": 0.5}],
           "train": train}
    path = tmp_path / "lip.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg, root / "train.jsonl"


def test_lip_cache_is_refused_after_transcripts_or_vocabulary_change(tmp_path, capsys):
    """The lip teacher's decoder context is teacher-forced on the transcripts through the vocabulary: a cache
    built before either changed (same manifest size, same vocabulary size) is refused, naming the part."""
    import yaml
    from _edits import same_size_edit

    from xmodal.cli import main

    cfg_path, cfg, manifest = lip_setup(tmp_path)
    assert main(["cache", str(cfg_path), "--no-progress"]) == 0

    def distill(run: str, **data) -> int:
        cfg_path.write_text(yaml.safe_dump({**cfg, "run_dir": str(tmp_path / run), "data": {**cfg["data"], **data}}))
        return main(["distill", str(cfg_path)])

    assert distill("same") == 0  # the same data: the cache is used
    original = manifest.read_text()
    same_size_edit(manifest, '"transcript": "ab"', '"transcript": "ba"')
    capsys.readouterr()
    assert distill("transcripts") == 2
    err = capsys.readouterr().err
    assert "does not fit this run: the data differ: train, transcripts" in err and "xmodal cache" in err

    manifest.write_text(original)
    assert distill("vocab", vocab="' " + "abcdefghijklmnopqrstuvwxyz") == 2
    assert "the data differ: vocab" in capsys.readouterr().err


def test_lip_trained_teacher_folder_follows_the_manifest_content(tmp_path):
    from _edits import same_size_edit

    from xmodal.config import from_dict
    from xmodal.tasks.lipread.config import LipreadDistillConfig
    from xmodal.tasks.lipread.job import resolve_manifests, teacher_folder

    _, cfg, manifest = lip_setup(tmp_path)
    teacher = {"model": {"n_mels": 20}, "train": {"steps": 1}}
    job = from_dict(LipreadDistillConfig, {k: v for k, v in {**cfg, "teacher": teacher}.items() if k != "job"})
    paths = resolve_manifests(job.data)
    folder = teacher_folder(job.teacher, job.data, paths, tmp_path / "run")
    assert teacher_folder(job.teacher, job.data, paths, tmp_path / "run") == folder
    same_size_edit(manifest, '"transcript": "ab"', '"transcript": "ba"')
    assert teacher_folder(job.teacher, job.data, paths, tmp_path / "run") != folder

"""Webdataset shards: `xmodal data shards` round trip and atomic writes, the rank × worker split, exact resume,
per-sample randomness, unreadable samples, and a clip_distill run from shards."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.cli import main
from xmodal.data.image_text import ImageTextDataset, read_records
from xmodal.data.shards import ShardDataset, ShardLoader, read_samples, shard_paths
from xmodal.engine.data import BatchStream

N_IMAGES = 24


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255


def noisy(im: Image.Image) -> torch.Tensor:
    """A random transform drawing from the global torch RNG, as torchvision's do."""
    return to_tensor(im) + torch.rand(1)


def write_images(folder: Path, n: int = N_IMAGES, corrupt: tuple[int, ...] = ()) -> Path:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["filepath\ttitle"]
    for i in range(n):
        path = folder / "img" / f"im.{i}.png"  # a dot in the name: the tar key must be sanitised
        if i in corrupt:
            path.write_bytes(b"\x89PNG not really an image")
        else:
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(path)
        rows += [f"img/im.{i}.png\tpicture {i} first", f"img/im.{i}.png\tpicture {i} second"]
    (folder / "data.tsv").write_text("\n".join(rows) + "\n")
    return folder / "data.tsv"


def make_shards(folder: Path, max_count: int = 6, **kw) -> str:
    source = write_images(folder, **kw)
    out = folder / "shards"
    assert main(["data", "shards", str(source), "--out", str(out), "--max-count", str(max_count),
                 "--no-progress"]) == 0
    return json.loads((out / "shards.json").read_text())["shards_pattern"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("shards"))


def dataset(pattern: str, **kw) -> ShardDataset:
    from xmodal.data.shards import TransformItem

    kw.setdefault("item_fn", TransformItem(to_tensor))
    kw.setdefault("shuffle_buffer", 4)
    return ShardDataset(pattern, kw.pop("local_batch", 3), **kw)


def epoch_ids(ds: ShardDataset, epoch: int) -> list[list[str]]:
    ds.set_epoch(epoch)
    return [batch["ids"] for batch, _ in ShardLoader(ds)]


# ---------------------------------------------------------------- writing


def test_shards_round_trip_keys_captions_and_image_bytes(shards, capsys):
    folder = Path(shards).parent
    paths = shard_paths(shards)
    assert [Path(p).name for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    records = {r.ref: r for r in read_records(folder.parent / "data.tsv")}
    samples = list(read_samples(paths))
    assert sorted(s.key for s in samples) == sorted(records)
    for s in samples:
        rec = records[s.key]
        assert s.problem is None and s.ext == "png" and s.captions == rec.captions
        assert s.image == Path(rec.image).read_bytes()
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        first = tar.extractfile([n for n in names if n.endswith(".txt")][0]).read().decode()
    assert all(n.count(".") == 1 and "/" not in n for n in names)  # sanitised keys: one dot, before the extension
    assert first == "picture 0 first"
    index = json.loads((folder / "shards.json").read_text())
    assert (index["samples"], index["captions"]) == (N_IMAGES, 2 * N_IMAGES)
    assert [e["samples"] for e in index["shards"]] == [6, 6, 6, 6]
    assert not list(folder.glob(".*"))  # no temporary files left
    with pytest.raises(SystemExit) as e:
        main(["data", "shards", "--help"])
    assert e.value.code == 0 and "shard-%06d.tar" in capsys.readouterr().out


def test_writing_refuses_existing_shards_and_an_interrupted_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    import xmodal.data.shards as shards_mod

    source = write_images(tmp_path)
    out = tmp_path / "out"
    real, calls = shards_mod._image_payload, []

    def dies_at_ten(path):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(shards_mod, "_image_payload", dies_at_ten)
    with pytest.raises(KeyboardInterrupt):
        shards_mod.write_shards(source, out, max_count=6, progress=False)
    finals = sorted(out.glob("shard-*.tar"))
    assert [p.name for p in finals] == ["shard-000000.tar"]  # the complete shard; the one in progress is gone
    assert len(list(read_samples([str(finals[0])]))) == 6
    assert not list(out.glob(".*")) and not (out / "shards.json").exists()
    monkeypatch.setattr(shards_mod, "_image_payload", real)
    with pytest.raises(Exception, match="--overwrite"):
        shards_mod.write_shards(source, out, max_count=6, progress=False)
    s = shards_mod.write_shards(source, out, max_count=12, progress=False, overwrite=True)
    assert [p.name for p in sorted(out.glob("shard-*.tar"))] == ["shard-000000.tar", "shard-000001.tar"]
    assert s.pattern.endswith("shard-{000000..000001}.tar") and s.samples == N_IMAGES


def test_tar_keys_are_tar_safe_and_unique():
    from xmodal.data.shards import tar_keys

    keys = tar_keys(["img/a.png", "img_a.png", "b c.jpg", "../up/d.png"])
    assert keys[2:] == ["b_c_jpg", "up_d_png"]
    assert keys[0] != keys[1] and all(k.startswith("img_a_png-") for k in keys[:2])
    assert keys == tar_keys(["img/a.png", "img_a.png", "b c.jpg", "../up/d.png"])


# ---------------------------------------------------------------- splitting, epochs, resume


def test_two_ranks_two_workers_read_disjoint_samples_covering_the_epoch(shards):
    everyone = sorted(s.key for s in read_samples(shard_paths(shards)))
    for epoch in (0, 1):
        seen = []
        per_rank = []
        for rank in (0, 1):
            ids = epoch_ids(dataset(shards, rank=rank, world_size=2, num_workers=2), epoch)
            assert all(len(b) == 3 for b in ids)
            per_rank.append(len(ids))
            seen += [k for b in ids for k in b]
        assert per_rank[0] == per_rank[1] == 4  # ranks step together
        assert sorted(seen) == everyone  # disjoint and complete
    a = epoch_ids(dataset(shards, world_size=1), 0)
    assert a == epoch_ids(dataset(shards, world_size=1), 0)  # deterministic per epoch
    assert a != epoch_ids(dataset(shards, world_size=1), 1)  # and reshuffled per epoch


def test_uneven_shards_cut_every_rank_at_the_same_number_of_batches(tmp_path):
    pattern = make_shards(tmp_path, max_count=7)  # shards of 7, 7, 7, 3 images
    counts = [len(epoch_ids(dataset(pattern, rank=r, world_size=2, local_batch=2), 0)) for r in (0, 1)]
    assert counts[0] == counts[1] == 5  # the smaller rank holds 10 images (7 + 3)


def test_caption_sampling_all_gives_every_caption_its_csv_key(shards, tmp_path):
    ds = dataset(shards, caption_sampling="all", local_batch=4)
    ids = [k for b in epoch_ids(ds, 0) for k in b]
    csv = ImageTextDataset(Path(shards).parent.parent / "data.tsv", caption_sampling="all")
    assert sorted(ids) == sorted(csv.sample_key(i) for i in range(len(csv)))


def test_resumed_stream_continues_exactly_where_it_stopped(shards):
    def stream():
        return BatchStream(ShardLoader(dataset(shards, num_workers=2, item_fn=_noisy_item())),
                           global_batch=3, seed=5)

    reference = stream()
    full = [next(reference) for _ in range(16)]  # two epochs of 8 batches
    for stop in (3, 8, 11):
        first = stream()
        for _ in range(stop):
            next(first)
        state = first.state()
        resumed = stream()
        resumed.load_state(state)
        rest = [next(resumed) for _ in range(16 - stop)]
        for a, b in zip(rest, full[stop:]):
            assert a["ids"] == b["ids"]
            assert torch.equal(a["image"], b["image"])


def test_resume_skips_samples_before_decoding_them(shards, monkeypatch):
    import xmodal.data.shards as shards_mod

    decoded = []
    real = shards_mod.decode_image
    monkeypatch.setattr(shards_mod, "decode_image", lambda s: decoded.append(s.key) or real(s))
    s = BatchStream(ShardLoader(dataset(shards)), global_batch=3, seed=0)
    s.load_state({"epoch": 0, "offset": 6})
    next(s)
    assert len(decoded) == 3  # one batch decoded, not the six before it


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([list(t.encode()[:32].ljust(32, b"\0")) for t in texts], dtype=torch.float32)


class Recorder(torch.nn.Module):
    """A tiny two-tower student that keeps the ids and images it was fed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(3 * 8 * 8, 8), torch.nn.Linear(32, 8)
        self.seen: list[tuple[list[str], torch.Tensor]] = []

    def forward(self, batch):
        from xmodal.features import Features

        self.seen.append((list(batch["ids"]), batch["image"].clone()))
        return {"image": Features(self.image(batch["image"].flatten(1))),
                "text": Features(self.text(batch["text"] / 255.0))}


def test_a_training_run_resumed_from_its_checkpoint_sees_the_same_batches(shards, tmp_path):
    from xmodal.config import TrainConfig
    from xmodal.data.shards import TransformItem
    from xmodal.engine import Distiller
    from xmodal.losses import build_losses

    def fit(run_dir, until=None, resume=False):
        cfg = TrainConfig(steps=11, batch_size=3, lr=1e-2, warmup_steps=1, log_every=1, device="cpu", seed=2,
                          num_workers=2, precision="fp32")
        data = ShardLoader(ShardDataset(shards, 3, num_workers=2, seed=2, caption_sampling="random",
                                        item_fn=TransformItem(noisy, tokenize)))
        student = Recorder()
        Distiller(student, build_losses([{"name": "clip"}]), data, cfg, run_dir, progress=False,
                  resume="latest" if resume else None).fit(until=until)
        return student.seen

    full = fit(tmp_path / "full")
    first = fit(tmp_path / "cut", until=5)  # stops inside epoch 0 (8 batches per epoch)
    rest = fit(tmp_path / "cut", resume=True)
    assert (len(full), len(first), len(rest)) == (11, 5, 6)
    for a, b in zip(full, first + rest):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


def _noisy_item():
    from xmodal.data.shards import TransformItem

    return TransformItem(noisy)


def test_per_sample_randomness_is_a_function_of_seed_key_and_epoch(shards):
    def items(epoch, **kw):
        ds = dataset(shards, caption_sampling="random", item_fn=_noisy_item(), seed=3, **kw)
        ds.set_epoch(epoch)
        out = {}
        for batch, _ in ShardLoader(ds):
            for k, image, text in zip(batch["ids"], batch["image"], batch["text"]):
                out[k] = (image, text)
        return out

    e0, e0_other_layout, e1 = items(0), items(0, world_size=1, shuffle_buffer=1, local_batch=4), items(1)
    shared = set(e0) & set(e0_other_layout)
    assert shared
    for k in shared:  # same (seed, key, epoch), another position in the stream: the same draws
        assert torch.equal(e0[k][0], e0_other_layout[k][0]) and e0[k][1] == e0_other_layout[k][1]
    both = set(e0) & set(e1)
    assert any(not torch.equal(e0[k][0], e1[k][0]) for k in both)  # another epoch: other draws
    assert len({e0[k][1] != e1[k][1] for k in both}) == 2  # some captions change with the epoch, some do not
    csv = ImageTextDataset(Path(shards).parent.parent / "data.tsv", transform=noisy, caption_sampling="random",
                           seed=3)
    for i in range(len(csv)):  # and the same draws as the CSV data set of the same images
        item = csv[i]
        if item["id"] in e0:
            assert torch.equal(item["image"], e0[item["id"]][0]) and item["text"] == e0[item["id"]][1]


# ---------------------------------------------------------------- unreadable samples


def test_unreadable_samples_are_replaced_counted_and_reported(tmp_path, caplog):
    pattern = make_shards(tmp_path, corrupt=(5,))
    # a fifth shard by hand: one sample without a caption, one fine
    extra = Path(pattern).parent / "shard-000004.tar"
    with tarfile.open(extra, "w") as tar:
        for name, data in [("nocap.png", (Path(tmp_path) / "img" / "im.1.png").read_bytes()),
                           ("good.png", (Path(tmp_path) / "img" / "im.2.png").read_bytes()),
                           ("good.txt", b"a caption")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    paths = shard_paths(pattern) + [str(extra)]
    ds = ShardDataset(paths, 2, item_fn=_noisy_item(), shuffle_buffer=1)
    s = BatchStream(ShardLoader(ds), global_batch=2, seed=0)
    batches = [next(s) for _ in range(13)]  # the whole epoch: 26 samples
    assert all(len(b["ids"]) == 2 for b in batches)
    assert sorted(s.skipped_keys) == ["img/im.5.png", "nocap"]
    seen = {k for b in batches for k in b["ids"]}
    assert "img/im.5.png" not in seen and "nocap" not in seen and "good" in seen
    assert "bad image bytes" in caplog.text and "no caption" in caplog.text
    with pytest.raises(Exception, match="im.5.png|nocap"):
        ds_raise = ShardDataset(paths, 2, item_fn=_noisy_item(), on_error="raise")
        list(ShardLoader(ds_raise))


def test_too_few_shards_for_the_readers_is_a_config_error(shards):
    with pytest.raises(Exception, match="num_workers"):
        dataset(shards, world_size=2, num_workers=4)


# ---------------------------------------------------------------- clip_distill


CLIP_JOB = """
job: clip_distill
run_dir: {run}
data: {{root: {data}, shards: "shards/shard-{{000000..000003}}.tar", shard_shuffle: 8, val: null, test: null}}
teacher:
  model_cfg:
    embed_dim: 16
    vision_cfg: {{image_size: 32, patch_size: 16, layers: 1, width: 32, head_width: 16}}
    text_cfg: {{context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1}}
{teacher}
student: {{shrink: {{vision: {{width: 0.5}}, text: {{width: 0.5}}}}}}
losses: [{{name: affinity}}]
train: {{steps: 5, batch_size: 8, warmup_steps: 1, log_every: 1}}
eval: {{zeroshot: false}}
"""


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from xmodal.data.scenes import generate_scene_dataset

    data = tmp_path_factory.mktemp("scenes")
    generate_scene_dataset(data, 32, 8, 8, seed=0, image_size=32, captions_per_image=2)
    assert main(["data", "shards", str(data / "train.csv"), "--out", str(data / "shards"), "--max-count", "8",
                 "--no-progress"]) == 0
    return data


def test_clip_distill_trains_from_shards_and_the_identity_covers_the_shard_files(scenes, tmp_path):
    import os

    from xmodal.config import JOBS, load_job_config
    from xmodal.tasks.clip.job import resolve_data, train_data_identity

    cfg_path = tmp_path / "job.yaml"
    # teacher.cache_views: views drawn online and shared by teacher and student, through the stream
    cfg_path.write_text(CLIP_JOB.format(run=tmp_path / "run", data=scenes, teacher="  cache_views: {count: 2}"))
    name, cfg = load_job_config(cfg_path)
    results = JOBS.get(name).run(cfg)
    assert results["stage0"]["step"] == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [0, 0, 0, 0, 1]  # 4 batches of 8 per epoch
    paths = resolve_data(cfg.data)
    before = train_data_identity(paths)
    shard = Path(shard_paths(cfg.data.shards, scenes)[2])
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        after = train_data_identity(paths)
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert before.digest != after.digest and before.differences(after) == ["shards"]


def test_teacher_cache_built_from_shards_serves_training_from_shards(scenes, tmp_path):
    from xmodal.config import JOBS, load_job_config

    cfg_path = tmp_path / "job.yaml"
    # a teacher trained (from the shards) once, then reused by both commands: the same weights in both
    cfg_path.write_text(CLIP_JOB.format(run=tmp_path / "run", data=scenes,
                                        teacher="  train: {steps: 1, batch_size: 8, warmup_steps: 0}"))
    cache = tmp_path / "cache"
    first = ["data.caption_sampling=first"]
    assert main(["cache", str(cfg_path), "--out", str(cache), "--no-progress", *sum([["--set", o] for o in first],
                                                                                        [])]) == 0
    from xmodal.engine import TeacherCache

    stored = TeacherCache(cache)
    keys = {s.key for s in read_samples(shard_paths(str(scenes / "shards/shard-{000000..000003}.tar")))}
    assert len(stored) == 32 and all(k in stored for k in keys)  # every image, under the stream's keys
    assert json.loads((cache / "manifest.json").read_text())["data"]["parts"].keys() == {"shards"}
    name, cfg = load_job_config(cfg_path, [*first, f"teacher.cache={cache}", "train.steps=3"])
    results = JOBS.get(name).run(cfg)
    assert results["stage0"]["step"] == 3


def test_shard_records_give_the_csv_data_sets_items_by_index(shards):
    from xmodal.data.shards import ShardRecords

    csv_path = Path(shards).parent.parent / "data.tsv"
    for sampling in ("first", "all"):
        records = ShardRecords(shard_paths(shards), caption_sampling=sampling, transform=to_tensor)
        csv = ImageTextDataset(csv_path, transform=to_tensor, caption_sampling=sampling)
        by_key = {csv.sample_key(i): csv[i] for i in range(len(csv))}
        assert len(records) == len(csv) and {records.sample_key(i) for i in range(len(records))} == set(by_key)
        for i in range(len(records)):
            item = records[i]
            ref = by_key[item["id"]]
            assert item["text"] == ref["text"] and torch.equal(item["image"], ref["image"])

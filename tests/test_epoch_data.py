"""The engine's data contract: per-epoch randomness as a pure function of (seed, sample key, epoch) that reaches
persistent workers and survives resume; stable sample keys; unreadable samples replaced and counted."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xmodal.config import TrainConfig
from xmodal.data.image_text import ImageTextDataset
from xmodal.engine import BatchStream, Distiller
from xmodal.features import Features
from xmodal.losses import build_losses
from xmodal.tasks.clip.data import PairedViews, View, collate_skipping

N_IMAGES, CAPTIONS, BATCH, TEXT_LEN = 12, 3, 4, 24


# ---------------------------------------------------------------- picklable pipelines and a recording student


def random_crop(image: Image.Image) -> torch.Tensor:
    """A train transform drawing from torch's global RNG, like open_clip's RandomResizedCrop."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.2, 1.0)), transforms.PILToTensor()])
    return tf(image).float() / 255.0


def tokenize(texts: list[str]) -> torch.Tensor:
    """Caption bytes as floats, so a batch's captions can be read back."""
    return torch.tensor([list(t.encode().ljust(TEXT_LEN, b"\0")[:TEXT_LEN]) for t in texts], dtype=torch.float32)


def caption_of(row: torch.Tensor) -> str:
    return bytes(int(v) for v in row.tolist()).rstrip(b"\0").decode()


class Recorder(nn.Module):
    """A tiny two-tower student that keeps what it was fed: (ids, captions, images) per batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(3 * 8 * 8, 8)
        self.text = nn.Linear(TEXT_LEN, 8)
        self.seen: list[tuple[list[str], list[str], torch.Tensor]] = []

    def forward(self, batch):
        self.seen.append((list(batch["ids"]), [caption_of(r) for r in batch["text"]], batch["image"].clone()))
        return {"image": Features(self.image(batch["image"].flatten(1))),
                "text": Features(self.text(batch["text"] / 255.0))}


# ---------------------------------------------------------------- data


def make_images(folder, n: int = N_IMAGES, size: int = 16) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        names.append(f"img/{k}.png")
    return names


def write_csv(path, rows) -> str:
    path.write_text("filepath,title\n" + "".join(f"{img},{cap}\n" for img, cap in rows))
    return str(path)


@pytest.fixture
def world(tmp_path):
    """12 noise images with 3 captions each, rows interleaved by caption."""
    names = make_images(tmp_path / "img")
    rows = [(name, f"c{j} of {k}") for j in range(CAPTIONS) for k, name in enumerate(names)]
    return tmp_path, rows


def clip_data(csv: str, sampling: str = "random", on_error: str = "skip") -> PairedViews:
    base = ImageTextDataset(csv, on_error=on_error, caption_sampling=sampling, seed=5)
    return PairedViews(base, [View(random_crop, tokenize)])


def stream_samples(data, num_workers: int, epochs: int, collate=collate_skipping) -> dict:
    """(epoch, id) → (caption, image) over `epochs` epochs of an engine BatchStream; every batch is full."""
    stream = BatchStream(data, global_batch=BATCH, seed=1, collate_fn=collate, num_workers=num_workers)
    out = {}
    for _ in range(epochs * (len(data) // BATCH)):
        batch = next(stream)
        epoch = stream.epoch  # the epoch of the batch just returned
        assert len(batch["ids"]) == BATCH
        for i, key in enumerate(batch["ids"]):
            out[(epoch, key)] = (caption_of(batch["text"][i]), batch["image"][i])
    return out


# ---------------------------------------------------------------- per-epoch randomness


@pytest.mark.parametrize("num_workers", [0, 2])
def test_captions_and_crops_change_every_epoch_and_are_a_pure_function(world, num_workers):
    tmp, rows = world
    data = clip_data(write_csv(tmp / "d.csv", rows))
    seen = stream_samples(data, num_workers, epochs=3)
    keys = sorted({k for _, k in seen})
    assert keys == sorted(f"img/{k}.png" for k in range(N_IMAGES)) and len(seen) == 3 * N_IMAGES
    # every caption of every image is drawn at some point, not one caption per image for the whole run
    assert {cap for cap, _ in seen.values()} > {cap for (e, _), (cap, _) in seen.items() if e == 0}
    assert sum(len({seen[(e, k)][0] for e in range(3)}) > 1 for k in keys) >= N_IMAGES // 2
    # the crop of each image differs between epochs
    for k in keys:
        crops = [seen[(e, k)][1] for e in range(3)]
        assert not torch.equal(crops[0], crops[1]) or not torch.equal(crops[1], crops[2])
    # ... and each sample is what a fresh data set gives for (seed, key, epoch): no worker or history dependence
    fresh = clip_data(write_csv(tmp / "d.csv", rows))
    for (epoch, key), (cap, image) in seen.items():
        fresh.set_epoch(epoch)
        item = fresh[[fresh.sample_key(i) for i in range(len(fresh))].index(key)]
        assert caption_of(item["text"]) == cap and torch.equal(item["image"], image)


def test_seeded_rngs_restores_the_global_state():
    from xmodal.engine.data import sample_seed, seeded_rngs

    torch.manual_seed(3)
    random.seed(3)
    expected = torch.rand(2), random.random()
    torch.manual_seed(3)
    random.seed(3)
    with seeded_rngs(sample_seed(0, "img/a.png", 1)):
        inner = torch.rand(2)
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    with seeded_rngs(sample_seed(0, "img/a.png", 1)):
        assert torch.equal(torch.rand(2), inner)
    assert sample_seed(0, "img/a.png", 1) != sample_seed(0, "img/a.png", 2) != sample_seed(1, "img/a.png", 2)


# ---------------------------------------------------------------- resume


def fit_and_record(data, run_dir, num_workers: int, until: int | None = None, resume: bool = False) -> list:
    cfg = TrainConfig(steps=8, batch_size=BATCH, lr=1e-2, warmup_steps=1, log_every=1, device="cpu", seed=2,
                      num_workers=num_workers, precision="fp32")
    student = Recorder()
    Distiller(student, build_losses([{"name": "clip"}]), data, cfg, run_dir, collate_fn=collate_skipping,
              resume="latest" if resume else None, progress=False).fit(until=until)
    return student.seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_run_gets_the_same_captions_and_crops(world, num_workers):
    tmp, rows = world
    csv = write_csv(tmp / "d.csv", rows)
    full = fit_and_record(clip_data(csv), tmp / "full", num_workers)
    first = fit_and_record(clip_data(csv), tmp / "cut", num_workers, until=4)  # stops inside epoch 1
    rest = fit_and_record(clip_data(csv), tmp / "cut", num_workers, resume=True)
    assert len(full) == 8 and len(first) == 4 and len(rest) == 4
    for a, b in zip(full, first + rest):
        assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    # the run itself saw new captions in later epochs (3 batches per epoch)
    per_epoch = [{(k, c) for ids, caps, _ in full[e * 3:(e + 1) * 3] for k, c in zip(ids, caps)} for e in (0, 1)]
    assert per_epoch[0] != per_epoch[1]


# ---------------------------------------------------------------- lip data


@pytest.fixture(scope="module")
def lip_corpus(tmp_path_factory):
    from xmodal.data.grid import synthesize_grid

    out = tmp_path_factory.mktemp("lipgrid")
    synthesize_grid(out, speakers=3, utterances=2, seed=1, roi_size=32, progress=False)
    return out


def lip_data(manifest):
    from xmodal.data.av import AVSpeechDataset, VideoConfig
    from xmodal.data.vocab import CharVocab

    video = VideoConfig(crop_size=24, hflip_prob=0.5, time_masks=1, time_mask_max_frames=6)
    return AVSpeechDataset(manifest, CharVocab(), video=video, audio=None, train=True, seed=3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lip_augmentation_changes_every_epoch_in_persistent_workers(lip_corpus, num_workers):
    from xmodal.data.av import collate_av

    data = lip_data(lip_corpus / "train.jsonl")
    n = len(data)
    assert n % 2 == 0
    stream = BatchStream(data, global_batch=2, seed=1, collate_fn=collate_av, num_workers=num_workers)
    seen = {}
    for _ in range(3 * (n // 2)):
        batch = next(stream)
        epoch = stream.epoch  # the epoch of the batch just returned
        for i, key in enumerate(batch["ids"]):
            seen[(epoch, key)] = batch["video"][i, : int(batch["video_lengths"][i])]
    keys = {k for _, k in seen}
    assert len(keys) == n and len(seen) == 3 * n
    for k in keys:
        videos = [seen[(e, k)] for e in range(3)]
        assert not torch.equal(videos[0], videos[1]) or not torch.equal(videos[1], videos[2])
    fresh = lip_data(lip_corpus / "train.jsonl")
    ids = [fresh.sample_key(i) for i in range(n)]
    for (epoch, key), video in seen.items():
        fresh.set_epoch(epoch)
        assert torch.equal(fresh[ids.index(key)]["video"], video)


def test_lip_augmentation_follows_the_sample_id_when_the_manifest_is_reordered(lip_corpus, tmp_path):
    lines = (lip_corpus / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for r in rows:
        r["video"] = str(lip_corpus / r["video"])
        r["audio"] = str(lip_corpus / r["audio"])
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    a, b = lip_data(tmp_path / "a.jsonl"), lip_data(tmp_path / "b.jsonl")
    n = len(a)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(n):
            assert a[i]["id"] == b[n - 1 - i]["id"] == a.sample_key(i)
            assert torch.equal(a[i]["video"], b[n - 1 - i]["video"])


# ---------------------------------------------------------------- stable keys


@pytest.mark.parametrize("sampling", ["first", "all"])
def test_ids_stay_with_their_image_when_rows_are_shuffled(world, sampling):
    tmp, rows = world
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    assert shuffled != rows

    def by_id(csv):
        base = ImageTextDataset(csv, caption_sampling=sampling)
        out = {}
        for i in range(len(base)):
            item = base[i]
            assert item["id"] == base.sample_key(i)
            pixels = np.asarray(item["image"]).tobytes()
            out[item["id"]] = (pixels, item["text"]) if sampling == "all" else pixels
        return out

    a, b = by_id(write_csv(tmp / "a.csv", rows)), by_id(write_csv(tmp / "b.csv", shuffled))
    assert len(a) == len(rows if sampling == "all" else {r[0] for r in rows}) and a == b
    # PairedViews passes the key on, not the row position
    views = clip_data(write_csv(tmp / "b.csv", shuffled), sampling)
    assert [views[i]["id"] for i in range(3)] == [views.sample_key(i) for i in range(3)]
    assert all(views[i]["id"].startswith("img/") for i in range(3))


def test_image_keys_are_the_written_reference_normalised(world):
    tmp, _ = world
    csv = write_csv(tmp / "d.csv", [("./img/0.png", "x"), ("img/1.png", "y"), ("img/0.png", "z")])
    ds = ImageTextDataset(csv)
    assert [ds.sample_key(i) for i in range(len(ds))] == ["img/0.png", "img/1.png"]
    all_ds = ImageTextDataset(csv, caption_sampling="all")
    keys = [all_ds.sample_key(i) for i in range(len(all_ds))]
    assert len(set(keys)) == 3 and [k.split("#")[0] for k in keys] == ["img/0.png", "img/0.png", "img/1.png"]


def test_repeated_image_caption_rows_get_distinct_keys_and_a_warning(world, caplog):
    tmp, _ = world
    csv = write_csv(tmp / "d.csv", [("img/0.png", "x"), ("img/1.png", "y"), ("img/0.png", "x")])
    with caplog.at_level(logging.WARNING, logger="xmodal.data.image_text"):
        ds = ImageTextDataset(csv, caption_sampling="all")
    keys = [ds.sample_key(i) for i in range(len(ds))]
    assert len(set(keys)) == 3 and keys[1] == keys[0] + ".2"
    assert any(f"{csv}:4" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- skipped samples


def broken_world(tmp, rows):
    broken = [("img/missing.png", "gone")] + rows[1:N_IMAGES]  # first caption of each image, one image missing
    return write_csv(tmp / "d.csv", broken)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_image_is_replaced_and_its_key_reported(world, num_workers):
    tmp, rows = world
    data = clip_data(broken_world(tmp, rows), sampling="first")
    stream = BatchStream(data, global_batch=BATCH, seed=1, collate_fn=collate_skipping, num_workers=num_workers)
    ids = []
    for _ in range(2 * len(data) // BATCH):  # two epochs
        batch = next(stream)
        assert len(batch["ids"]) == BATCH and batch["image"].shape[0] == BATCH and batch["text"].shape[0] == BATCH
        ids.append(batch["ids"])
    assert stream.skipped_keys == ["img/missing.png"] and stream.skipped_samples == 1
    assert "img/missing.png" not in {k for b in ids for k in b}
    assert stream.state()["skipped_keys"] == ["img/missing.png"]
    # the replacement depends on (seed, index, epoch) only
    again = BatchStream(clip_data(broken_world(tmp, rows), sampling="first"), global_batch=BATCH, seed=1,
                        collate_fn=collate_skipping)
    assert [next(again)["ids"] for _ in ids] == ids


def test_fit_reports_skipped_samples_and_keeps_them_across_resume(world):
    tmp, rows = world
    csv = broken_world(tmp, rows)
    cfg = TrainConfig(steps=4, batch_size=BATCH, lr=1e-2, warmup_steps=1, log_every=1, device="cpu")
    first = Distiller(Recorder(), build_losses([{"name": "clip"}]), clip_data(csv, "first"), cfg, tmp / "run",
                      collate_fn=collate_skipping, progress=False)
    assert first.fit(until=3)["skipped_samples"] == 1  # one epoch: the missing image was met
    resumed = Distiller(Recorder(), build_losses([{"name": "clip"}]), clip_data(csv, "first"), cfg, tmp / "run",
                        collate_fn=collate_skipping, resume="latest", progress=False)
    result = resumed.fit()
    assert result["step"] == 4 and result["skipped_samples"] == 1
    assert resumed.stream.skipped_keys == ["img/missing.png"]


def test_clip_job_results_count_skipped_samples(world):
    from xmodal.config import JOBS, load_job_config

    tmp, rows = world
    for k in range(N_IMAGES):  # the job's tiny models read 32-pixel images
        Image.open(tmp / "img" / f"{k}.png").resize((32, 32)).save(tmp / "img" / f"{k}.png")
    csv = broken_world(tmp, rows)
    model = ("model_cfg: {embed_dim: 16, vision_cfg: {image_size: 32, patch_size: 16, layers: 1, width: 32, "
             "head_width: 16}, text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, layers: 1}}")
    (tmp / "job.yaml").write_text(f"""
job: clip_distill
run_dir: {tmp / 'run'}
data: {{train: {csv}, val: null, test: null, zeroshot: null, caption_sampling: first}}
teacher:
  {model}
  train: {{steps: 1, batch_size: {BATCH}, warmup_steps: 1, log_every: 1, device: cpu}}
student:
  {model}
  inherit: null
losses: [{{name: clip}}]
train: {{steps: 3, batch_size: {BATCH}, warmup_steps: 1, log_every: 1, device: cpu}}
""")
    name, cfg = load_job_config(tmp / "job.yaml")
    JOBS.get(name).run(cfg)
    results = json.loads((tmp / "run" / "results.json").read_text())
    assert results["stage0"]["skipped_samples"] == 1

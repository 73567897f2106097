"""Teacher cache at scale: two gloo processes build the cache one process builds, a killed rank's build resumes,
and an augmentation-aware cache replays each stored view exactly."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from xmodal.engine import TeacherCache, build_cache
from xmodal.engine.cache import cache_items
from xmodal.errors import CheckpointError
from xmodal.features import Features
from xmodal.lock import FolderLock, LockedError

WORLD = 2
FP = "teacher-fp-scale"
N = 29  # 10 shards of 3 (the last holds 2): rank shares of 5 shards each
SHARD, BATCH = 3, 2
UNREADABLE = 13
COLLECTIVE_TIMEOUT_S = 300  # a hung collective fails inside the processes, with the waiting rank's traceback
TIMEOUT_S = 900  # backstop for the whole spawn, interpreter start-up included (slow on a saturated machine)


class Samples(Dataset):
    """Samples with a key, a feature vector and a sequence length; one cannot be read (None, recorded as skipped)."""

    def __init__(self, n: int = N):
        self.x = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def sample_key(self, i: int) -> str:
        return f"k{i:03d}"

    def __getitem__(self, i: int):
        if i == UNREADABLE:
            return None
        return {"id": self.sample_key(i), "x": self.x[i], "length": 1 + i % 4}


class Teacher:
    """Per-sample outputs (pooled and a variable-length token sequence); optionally logs the ids it computed and
    fails (like a killed process) on a given sample."""

    def __init__(self, log: str | None = None, fail_on: str | None = None):
        self.log, self.fail_on = log, fail_on

    def __call__(self, batch) -> dict[str, Features]:
        if self.log:
            with open(self.log, "a") as f:
                f.write("".join(f"{i}\n" for i in batch["ids"]))
        if self.fail_on in batch["ids"]:
            raise RuntimeError(f"simulated crash at {self.fail_on}")
        x, lengths = batch["x"], batch["length"]
        t = int(lengths.max())
        mask = torch.arange(t)[None, :] < lengths[:, None]
        tokens = x[:, None, :3] * torch.arange(1, t + 1, dtype=torch.float32)[None, :, None] * mask[..., None]
        return {"image": Features(pooled=x * 2 - 1), "audio": Features(pooled=x[:, :2], tokens=tokens, mask=mask)}


def build(root, teacher=None, **kw) -> Path:
    return build_cache(teacher or Teacher(), Samples(), root, FP, batch_size=BATCH, shard_size=SHARD,
                       progress=False, **kw)


def assert_same_cache(a: Path, b: Path) -> None:
    """Same keys, same skipped ids and identical lookups, whatever order the keys are asked in."""
    ca, cb = TeacherCache(a, fingerprint=FP), TeacherCache(b, fingerprint=FP)
    keys = sorted(cache_items(ca))
    assert keys == sorted(cache_items(cb)) and len(keys) == N - 1
    assert ca.skipped == cb.skipped == {f"k{UNREADABLE:03d}"}
    ids = [k for k, _ in keys][::-1]
    la, lb = ca.lookup(ids), cb.lookup(ids)
    assert la.keys() == lb.keys() == {"image", "audio"}
    for m in la:
        assert torch.equal(la[m].pooled, lb[m].pooled)
    assert torch.equal(la["audio"].tokens, lb["audio"].tokens) and torch.equal(la["audio"].mask, lb["audio"].mask)
    # Same content per sample: expected values from the teacher itself, to float16.
    ref = Teacher()({"ids": ["k005"], "x": Samples().x[5:6], "length": torch.tensor([2])})
    torch.testing.assert_close(cb.lookup(["k005"])["image"].pooled, ref["image"].pooled.half().float())


# ---------------------------------------------------------------- spawning two gloo processes on CPU


def join_group(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def spawn(fn, args: tuple) -> None:
    """Run `fn(rank, *args)` in WORLD processes; a failing rank fails the call with its traceback (and the others
    are stopped); processes still running after TIMEOUT_S are stopped and the test fails."""
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            pytest.fail(f"ranks {alive} of {WORLD} neither finished nor failed within {TIMEOUT_S} s")


def _build_worker(rank: int, init_file: str, out: str, held: str, fail_rank: int, fail_on: str | None) -> None:
    join_group(rank, init_file)
    try:
        torch.set_num_threads(1)
        if held:  # another builder holds this folder: every rank of the group is refused, none writes there
            try:
                build(held)
            except LockedError as e:
                Path(out).parent.joinpath(f"refused_rank{rank}.txt").write_text(str(e))
            try:  # ranks that load different teachers (e.g. unseeded random weights) must not mix their shards
                build_cache(Teacher(), Samples(), Path(out).parent / "mixed", f"{FP}-rank{rank}", progress=False)
            except CheckpointError as e:
                Path(out).parent.joinpath(f"mixed_rank{rank}.txt").write_text(str(e))
        log = str(Path(out).parent / f"computed_rank{rank}.txt")
        build(out, Teacher(log, fail_on if rank == fail_rank else None))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_build_the_one_process_cache(tmp_path):
    held = tmp_path / "held"
    lock = FolderLock(held, "teacher cache").acquire()
    try:
        spawn(_build_worker, (str(tmp_path / "init"), str(tmp_path / "two"), str(held), -1, None))
    finally:
        lock.release()
    for r in range(WORLD):  # a second, independent build was refused on every rank, naming the holder
        assert f"process {os.getpid()}" in (tmp_path / f"refused_rank{r}.txt").read_text()
    assert sorted(p.name for p in held.iterdir()) == [".lock"]
    for r in range(WORLD):
        assert "different teachers or data (rank 1 vs rank 0" in (tmp_path / f"mixed_rank{r}.txt").read_text()
    assert not [p.name for p in (tmp_path / "mixed").iterdir() if "shard" in p.name]
    one = build(tmp_path / "one")
    assert_same_cache(one, tmp_path / "two")
    # Each rank computed a disjoint share, together every readable sample once.
    computed = [(tmp_path / f"computed_rank{r}.txt").read_text().split() for r in range(WORLD)]
    assert computed[0] and computed[1] and not set(computed[0]) & set(computed[1])
    assert sorted(computed[0] + computed[1]) == sorted(k for k, _ in cache_items(TeacherCache(one)))
    # One merged manifest, no rank records left; the shards are those of the one-process build.
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (one, tmp_path / "two"))
    assert m2["complete"] and m2["plan"] == m1["plan"]
    assert m2["build"]["processes"] == 2 and m1["build"]["processes"] == 1 and m2["build"]["seconds"] > 0
    assert [(e["name"], e["files"]) for e in m2["shards"]] == [(e["name"], e["files"]) for e in m1["shards"]]
    assert not list((tmp_path / "two").glob("manifest.rank*.json"))
    assert m2["storage"] == m1["storage"] and m2["storage"]["rows"] == N - 1


def test_a_killed_rank_resumes_its_finished_shards_and_any_world_size_finishes(tmp_path):
    out = tmp_path / "cache"
    # Rank 1 fails in its third shard (k015..k017 is shard 5, rank 1's third of 1, 3, 5, 7, 9); the group stops.
    # Whichever rank's error spawn reports first is raised: rank 1's crash, or rank 0 losing its peer at the
    # barrier, so the crash is checked through what rank 1 recorded, not through the message.
    with pytest.raises(mp.ProcessRaisedException, match="simulated crash at k016|Connection (closed|reset) by peer"):
        spawn(_build_worker, (str(tmp_path / "init"), str(out), "", 1, "k016"))
    record = json.loads((out / "manifest.rank1.json").read_text())
    assert [e["name"] for e in record["shards"]] == ["shard_00001", "shard_00003"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(Exception, match="incomplete"):
        TeacherCache(out)
    finished = {k for e in record["shards"] for k, _ in json.loads((out / e["name"] / "ids.json").read_text())}
    # A restarted two-process build keeps what each rank finished and computes only the rest.
    for r in range(WORLD):
        (tmp_path / f"computed_rank{r}.txt").unlink(missing_ok=True)
    spawn(_build_worker, (str(tmp_path / "init2"), str(out), "", -1, None))
    again = set()
    for r in range(WORLD):
        p = tmp_path / f"computed_rank{r}.txt"
        again |= set(p.read_text().split()) if p.exists() else set()
    assert "k016" in again and not again & finished
    assert_same_cache(build(tmp_path / "one"), out)


def test_a_partial_two_process_build_finishes_in_one_process(tmp_path):
    """The plan does not depend on the world size: shards recorded by the ranks of a stopped build are kept."""
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):  # a one-process build stopped part way ...
        build(out, Teacher(fail_on="k010"))
    assert [e["name"] for e in json.loads((out / "manifest.json").read_text())["shards"]] == [
        f"shard_{k:05d}" for k in range(3)]
    # ... and rank records as a stopped two-process build leaves them: rank 1 finished shard 5, rank 0 shard 4.
    ref = build(tmp_path / "one")
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    for r, k in ((0, 4), (1, 5)):
        entry = ref_manifest["shards"][k]
        shutil.copytree(ref / entry["name"], out / entry["name"])
        (out / f"manifest.rank{r}.json").write_text(json.dumps(
            {"format": "xmodal-teacher-cache-rank", "fingerprint": FP, "plan": manifest["plan"], "rank": r,
             "processes": 2, "fields": ref_manifest["fields"], "shards": [entry]}))
    log = tmp_path / "computed.txt"
    build(out, Teacher(str(log)))
    # Only shard 3 (where the one-process build stopped) and shards 6 to 9 were computed.
    assert sorted(set(log.read_text().split())) == [f"k{i:03d}" for i in (9, 10, 11, *range(18, N))]
    assert_same_cache(ref, out)
    assert not list(out.glob("manifest.rank*.json"))


# ---------------------------------------------------------------- augmentation-aware cache (CLIP job)

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32,
                                             "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
VIEWS = 3


def clip_views_config(tmp_path, cache=None) -> Path:
    """A CLIP job on 24 synthetic images (48 px, so crops are resized to the 32-px teacher) with 3 cached views."""
    from xmodal.students.clip import create_student
    from xmodal.students.export import export_open_clip

    teacher = tmp_path / "teacher_open_clip"
    if not teacher.is_dir():
        torch.manual_seed(0)
        export_open_clip(create_student(TINY_CLIP), TINY_CLIP, teacher)
    path = tmp_path / ("cached.yaml" if cache else "job.yaml")
    path.write_text(f"""job: clip_distill
run_dir: {tmp_path / "run"}
data:
  root: {tmp_path / "data"}
  synthetic: {{train: 24, val: 8, test: 8, image_size: 48}}
  caption_sampling: first
  val: null
  test: null
  zeroshot: null
teacher:
  model: {teacher}
  cache_views: {{count: {VIEWS}, flip: 0.5, seed: 3}}
{f"  cache: {cache}" if cache else ""}
student:
  shrink: {{vision: {{layers: 1}}, text: {{layers: 1}}}}
train: {{steps: 2, batch_size: 8, warmup_steps: 0, log_every: 1, ckpt_every: 0}}
eval: {{zeroshot: false}}
""")
    return path


def test_view_renderer_is_the_clip_train_transform_for_the_same_crop(tmp_path):
    """Without a flip, rendering a crop box is exactly open_clip's train transform drawing that box."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    from xmodal.engine.data import seeded_rngs
    from xmodal.openclip import build_open_clip, bundle_model
    from xmodal.tasks.clip.data import ViewRenderer

    bundle = bundle_model(build_open_clip(TINY_CLIP), TINY_CLIP)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    crop = next(t for t in bundle.train_transform.transforms if isinstance(t, RandomResizedCrop))
    for seed in range(3):
        with seeded_rngs(seed):
            expected = bundle.train_transform(image)
        with seeded_rngs(seed):
            box = crop.get_params(image, crop.scale, crop.ratio)
        render = ViewRenderer(bundle.preprocess_cfg)
        assert torch.equal(render(image, [*box, 0]), expected)
        assert torch.equal(render(image, [*box, 1]), expected.flip(-1))


def test_augmentation_aware_cache_replays_the_stored_view(tmp_path, capsys):
    import numpy as np

    from xmodal.cli import main
    from xmodal.config import load_job_config
    from xmodal.tasks.clip.data import PairedViews, collate_skipping
    from xmodal.tasks.clip.job import cache_source, view_recipe

    cache = tmp_path / "cache"
    config = clip_views_config(tmp_path)
    assert main(["cache", str(config), "--out", str(cache), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"(72 rows: 24 samples × {VIEWS} views)" in out
    manifest = json.loads((cache / "manifest.json").read_text())
    storage = manifest["storage"]
    # Per row (one sample, one view): two float16 embeddings of 32, five float32 view parameters, its id.
    by_file = storage["bytes_per_row_by_file"]
    assert by_file["image.pooled.bin"] == by_file["text.pooled.bin"] == 64 and by_file["view_params.bin"] == 20
    assert storage["bytes_per_sample_per_view"] == pytest.approx(sum(by_file.values()), abs=0.02)
    assert storage["bytes_per_sample"] == pytest.approx(VIEWS * storage["bytes_per_sample_per_view"], abs=0.1)
    assert f"storage: {storage['bytes_per_sample_per_view']:.1f} bytes per sample per view" in out
    assert manifest["plan"]["views"]["count"] == VIEWS and manifest["plan"]["views"]["flip"] == 0.5

    _, cfg = load_job_config(config)
    source = cache_source(cfg)
    recipe = view_recipe(cfg)
    teacher_cache = TeacherCache(cache, fingerprint=source.fingerprint)
    base = source.dataset.base
    # The student's pipeline here is the teacher's, so its re-rendered view through the teacher must give the
    # stored embedding.
    data = PairedViews(base, [source.dataset.view], seed=7).share_views(recipe, teacher_cache)
    chosen = {}
    flips = set()
    for epoch in range(4):
        data.set_epoch(epoch)
        items = [data[i] for i in range(len(data))]
        again = [data[i] for i in range(len(data))]
        batch = collate_skipping(items)
        assert batch["aug_index"].tolist() == collate_skipping(again)["aug_index"].tolist()  # same epoch, same view
        assert torch.equal(batch["image"], collate_skipping(again)["image"])
        stored = teacher_cache.view_params(batch["ids"], batch["aug_index"])
        assert torch.equal(batch["view_params"], torch.from_numpy(stored))  # the parameters are the stored ones
        for key, v, params in zip(batch["ids"], batch["aug_index"].tolist(), stored):
            assert np.array_equal(params, recipe.draw(key, v, 48, 48))  # ... drawn at build time by the recipe
            chosen.setdefault(key, []).append(v)
            flips.add(float(params[4]))
        with torch.inference_mode():
            online = source.teacher(batch)
        looked_up = teacher_cache(batch)
        for m in ("image", "text"):
            torch.testing.assert_close(looked_up[m].pooled, online[m].pooled, rtol=2e-3, atol=2e-3)
    assert flips == {0.0, 1.0}
    assert all(0 <= v < VIEWS for vs in chosen.values() for v in vs)
    assert sum(len(set(vs)) > 1 for vs in chosen.values()) > len(chosen) // 2  # epochs pick different views

    # The job trains from the cache, replaying its views.
    assert main(["distill", str(clip_views_config(tmp_path, cache=cache))]) == 0


def _cli_worker(rank: int, port: int, config: str, out: str, log_dir: str) -> None:
    """`xmodal cache` as torchrun starts it: RANK/WORLD_SIZE/MASTER_* in the environment, the CLI joins the group."""
    import contextlib
    import io

    from xmodal.cli import main

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["cache", config, "--out", out, "--no-progress", "--device", "cpu"])
        Path(log_dir, f"cli_rank{rank}.txt").write_text(f"{code}\n{stdout.getvalue()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cli_under_torchrun_builds_the_augmentation_aware_cache_of_one_process(tmp_path):
    import socket

    from xmodal.config import load_job_config
    from xmodal.tasks.clip.job import resolve_data

    config = clip_views_config(tmp_path)
    resolve_data(load_job_config(config)[1].data)  # the world first: two processes must not generate it at once
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(_cli_worker, (port, str(config), str(tmp_path / "two"), str(tmp_path)))
    code0, out0 = (tmp_path / "cli_rank0.txt").read_text().split("\n", 1)
    code1, out1 = (tmp_path / "cli_rank1.txt").read_text().split("\n", 1)
    assert code0 == code1 == "0" and out1 == ""  # only rank 0 reports
    assert f"(72 rows: 24 samples × {VIEWS} views, built by 2 processes)" in out0
    assert "bytes per sample per view" in out0
    from xmodal.cli import main

    assert main(["cache", str(config), "--out", str(tmp_path / "one"), "--no-progress", "--device", "cpu"]) == 0
    one, two = TeacherCache(tmp_path / "one"), TeacherCache(tmp_path / "two")
    keys = sorted(cache_items(one))
    assert keys == sorted(cache_items(two)) and len(keys) == 24 * VIEWS
    ids, augs = [k for k, _ in keys], [a for _, a in keys]
    for m, f in one.lookup(ids, augs).items():
        assert torch.equal(f.pooled, two.lookup(ids, augs)[m].pooled), m
    assert (one.view_params(ids, augs) == two.view_params(ids, augs)).all()

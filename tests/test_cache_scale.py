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
    one = build(tmp_path / "one")
    assert_same_cache(one, tmp_path / "two")
    # Each rank computed a disjoint share, together every readable sample once.
    computed = [(tmp_path / f"computed_rank{r}.txt").read_text().split() for r in range(WORLD)]
    assert computed[0] and computed[1] and not set(computed[0]) & set(computed[1])
    assert sorted(computed[0] + computed[1]) == sorted(k for k, _ in cache_items(TeacherCache(one)))
    # One merged manifest, no rank records left; the shards are those of the one-process build.
    m1, m2 = (json.loads((p / "manifest.json").read_text()) for p in (one, tmp_path / "two"))
    assert m2["complete"] and m2["build"] == {"processes": 2} and m2["plan"] == m1["plan"]
    assert [(e["name"], e["files"]) for e in m2["shards"]] == [(e["name"], e["files"]) for e in m1["shards"]]
    assert not list((tmp_path / "two").glob("manifest.rank*.json"))
    assert m2["storage"] == m1["storage"] and m2["storage"]["rows"] == N - 1


def test_a_killed_rank_resumes_its_finished_shards_and_any_world_size_finishes(tmp_path):
    out = tmp_path / "cache"
    # Rank 1 fails in its third shard (k015..k017 is shard 5, rank 1's third of 1, 3, 5, 7, 9); the group stops.
    with pytest.raises(mp.ProcessRaisedException, match="simulated crash at k016"):
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

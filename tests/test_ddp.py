"""Two gloo processes give the single-process loss, gradients and training run on the same global batch, also
when an image cannot be read."""

from __future__ import annotations

import datetime
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _pairs import PairData
from torch import nn

from xmodal.config import TrainConfig
from xmodal.engine import Distiller, Objective, compute_loss, wrap_ddp
from xmodal.features import Features
from xmodal.losses import build_losses

WORLD = 2
GLOBAL_BATCH = 8
# A hung collective is caught inside the processes: a rank that waits this long for the other in a collective (or
# in the rendezvous) fails with gloo's timeout error and its traceback. Once both ranks have joined, they wait for
# each other a fraction of a second per step, so this only trips on a real hang or a dead peer.
COLLECTIVE_TIMEOUT_S = 300
# The whole spawn, interpreter start-up included: only a backstop for a process stuck outside any collective. Start-up
# dominates under load (each process imports torch and xmodal: seconds alone, over 100 s for the pair on a
# saturated 2-core machine), so a tight wall-clock limit here fails slow runs that are not hung.
TIMEOUT_S = 900
LOSSES = [{"name": "affinity", "params": {"learn_scale": True}}, {"name": "clip", "weight": 0.5}]


class TwoTower(nn.Module):
    def __init__(self, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, width))
        self.text = nn.Linear(10, width)
        self.logit_scale = nn.Parameter(torch.ones(()))  # unused, like open_clip's when only towers are used

    def forward(self, batch):
        return {"image": Features(self.image(batch["image"])), "text": Features(self.text(batch["text"]))}


def global_batch() -> dict:
    data = PairData()
    return {"ids": [f"p{i}" for i in range(GLOBAL_BATCH)], "image": data.image[:GLOBAL_BATCH],
            "text": data.text[:GLOBAL_BATCH]}


def loss_and_grads(batch: dict, distributed: bool) -> dict:
    """Affinity + CLIP loss of a fresh student on `batch` (DDP-wrapped when distributed), and its gradients."""
    teacher, student = TwoTower(24, seed=1).eval(), TwoTower(16, seed=2)
    objective = Objective(student, build_losses(LOSSES))
    model = wrap_ddp(objective, torch.device("cpu"), find_unused_parameters=True) if distributed else objective
    out = compute_loss(model, teacher, batch, torch.device("cpu"))
    out.loss.backward()
    return {"loss": out.loss.detach(), "parts": {k: v.detach() for k, v in out.parts.items()},
            "grads": {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}}


def fit(run_dir) -> dict:
    cfg = TrainConfig(steps=3, batch_size=GLOBAL_BATCH, lr=1e-2, warmup_steps=1, log_every=1, ckpt_every=2,
                      device="cpu", clip_grad_norm=None)
    student = TwoTower(16, seed=2)
    result = Distiller(student, build_losses(LOSSES), PairData(), cfg, run_dir, teacher=TwoTower(24, seed=1),
                       progress=False).fit()
    return {"state": student.state_dict(), "loss": result["loss"]}


def join_group(rank: int, init_file: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    join_group(rank, init_file)
    try:
        torch.set_num_threads(1)
        batch = global_batch()
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        mine = {"ids": batch["ids"][local], "image": batch["image"][local], "text": batch["text"][local]}
        torch.save(loss_and_grads(mine, distributed=True), f"{out_dir}/step_rank{rank}.pt")
        torch.save(fit(f"{out_dir}/run"), f"{out_dir}/fit_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, args: tuple) -> None:
    """Run `fn(rank, *args)` in WORLD processes. A rank that fails (a collective timing out included) fails the test
    with its traceback; processes still running after TIMEOUT_S are stopped and the test fails."""
    ctx = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            pytest.fail(f"ranks {alive} of {WORLD} neither finished nor failed within {TIMEOUT_S} s")


def test_two_process_gloo_matches_single_process(tmp_path):
    spawn(_worker, (str(tmp_path / "init"), str(tmp_path)))
    single = loss_and_grads(global_batch(), distributed=False)
    assert single["grads"]
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"step_rank{rank}.pt", weights_only=True)
        # Each rank's loss over the gathered global batch is the single-process loss ...
        torch.testing.assert_close(ddp["loss"], single["loss"], rtol=1e-6, atol=1e-6)
        for k in single["parts"]:
            torch.testing.assert_close(ddp["parts"][k], single["parts"][k], rtol=1e-6, atol=1e-6)
        # ... and after DDP averaging every gradient, the loss's temperature included, is the single-process one.
        assert ddp["grads"].keys() == single["grads"].keys()
        for name, g in single["grads"].items():
            torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)

    # A short training run: ranks end identical and equal to one process seeing the same global batches.
    reference = fit(tmp_path / "single")
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"fit_rank{rank}.pt", weights_only=True)
        for k, v in reference["state"].items():
            torch.testing.assert_close(run["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert abs(run["loss"] - reference["loss"]) < 1e-5
    # Only rank 0 wrote logs and checkpoints.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest", "step_0000002.pt", "step_0000003.pt"
    ]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert ckpt["world_size"] == WORLD and len(ckpt["rng_per_rank"]) == WORLD


# ---------------------------------------------------------------- an unreadable image under DDP


def image_vector(image) -> torch.Tensor:
    """A 2x2 RGB image as the 12-vector the tiny towers read."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.resize((2, 2)), dtype=np.float32).reshape(12) / 255.0)


def caption_vector(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[float(b) / 255.0 for b in t.encode().ljust(10, b"\0")[:10]] for t in texts])


def write_broken_data(folder) -> str:
    """10 small images and a CSV that also lists one missing image."""
    import numpy as np
    from PIL import Image

    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["img/missing.png,nothing here"]
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / "img" / f"{k}.png")
        rows.append(f"img/{k}.png,caption {k}")
    (folder / "d.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    return str(folder / "d.csv")


def fit_broken(csv: str, run_dir) -> dict:
    from xmodal.data.image_text import ImageTextDataset
    from xmodal.tasks.clip.data import PairedViews, View, collate_skipping

    cfg = TrainConfig(steps=3, batch_size=GLOBAL_BATCH, lr=1e-2, warmup_steps=1, log_every=1, device="cpu",
                      clip_grad_norm=None)
    data = PairedViews(ImageTextDataset(csv, on_error="skip"), [View(image_vector, caption_vector)])
    student = TwoTower(16, seed=2)
    result = Distiller(student, build_losses(LOSSES), data, cfg, run_dir, teacher=TwoTower(24, seed=1),
                       collate_fn=collate_skipping, progress=False).fit()
    return {"state": student.state_dict(), "loss": result["loss"], "skipped": result["skipped_samples"]}


def _broken_worker(rank: int, init_file: str, out_dir: str, csv: str) -> None:
    join_group(rank, init_file)
    try:
        torch.set_num_threads(1)
        torch.save(fit_broken(csv, f"{out_dir}/run"), f"{out_dir}/broken_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_unreadable_image_keeps_ranks_in_step(tmp_path):
    """The missing image is replaced on its rank, so gathered losses see equal batches: no hang, no divergence,
    the same run as one process, and the skipped key counted once."""
    csv = write_broken_data(tmp_path / "data")
    spawn(_broken_worker, (str(tmp_path / "init"), str(tmp_path), csv))
    reference = fit_broken(csv, tmp_path / "single")
    assert reference["skipped"] == 1
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"broken_rank{rank}.pt", weights_only=True)
        for k, v in reference["state"].items():
            torch.testing.assert_close(run["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert abs(run["loss"] - reference["loss"]) < 1e-5 and run["skipped"] == 1


# ---------------------------------------------------------------- the harness itself


def _hanging_worker(rank: int, init_file: str) -> None:
    join_group(rank, init_file, timeout_s=3)
    try:
        if rank == 0:
            dist.all_reduce(torch.ones(1))  # rank 1 never joins this collective
        else:
            time.sleep(120)
    finally:
        dist.destroy_process_group()


def test_a_hung_collective_fails_fast_naming_the_rank(tmp_path):
    """A hang is caught by the collective timeout inside the processes, with the waiting rank's traceback, not by
    the harness's wall-clock backstop (which also counts interpreter start-up, slow under load)."""
    with pytest.raises(mp.ProcessRaisedException, match=r"(?s)Process 0 terminated.*all_reduce.*Timed out"):
        spawn(_hanging_worker, (str(tmp_path / "init"),))


def _world_worker(rank: int, init_file: str, root: str) -> None:
    from xmodal.tasks.clip.config import DataConfig, SyntheticDataConfig
    from xmodal.tasks.clip.job import resolve_data

    join_group(rank, init_file)
    try:
        data = DataConfig(root=root, synthetic=SyntheticDataConfig(train=24, val=8, test=8, image_size=16))
        paths = resolve_data(data)
        with open(f"{root}/../paths_rank{rank}.json", "w") as f:
            json.dump({"train": str(paths.train), "rows": paths.train.read_text().count("\n")}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_generate_the_synthetic_world_once_without_racing(tmp_path):
    """Under torchrun every rank resolves the data; the synthetic world is written once (by rank 0) and the others
    find it (they used to write the same files at once and crash on each other's temporary files)."""
    spawn(_world_worker, (str(tmp_path / "init"), str(tmp_path / "world")))
    got = [json.loads((tmp_path / f"paths_rank{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1] and got[0]["rows"] > 24
    assert not list((tmp_path / "world").rglob("*.partial*"))

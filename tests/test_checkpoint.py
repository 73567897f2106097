"""Checkpoints: atomic writes (crash mid-write, SIGKILL), exact resume, refusal of other teachers and configs."""

from __future__ import annotations

import io
import os
import random
import runpy
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import numpy as np
import pytest
import torch

from xmodal.engine import (
    CheckpointManager,
    capture_rng,
    config_differences,
    load_checkpoint,
    read_metrics,
    restore_rng,
    save_checkpoint,
)
from xmodal.errors import CheckpointError

# A tiny training setup shared by this process and a subprocess that gets killed mid-run.
SETUP = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from xmodal.config import TrainConfig
    from xmodal.engine import Distiller
    from xmodal.features import Features
    from xmodal.losses import build_losses

    class Data(Dataset):
        def __init__(self, n=40):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            return {"id": f"s{i}", "image": self.x[i], "text": self.y[i]}

    class TwoTower(nn.Module):
        def __init__(self, width, dropout, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.image = nn.Sequential(nn.Linear(12, width), nn.Dropout(dropout), nn.Linear(width, width))
            self.text = nn.Linear(10, width)
        def forward(self, batch):
            return {"image": Features(self.image(batch["image"])), "text": Features(self.text(batch["text"]))}

    def config(steps=40, ckpt_every=1, keep_last=2, lr=0.01, **train):
        return {"job": "test", "train": dict(dict(steps=steps, batch_size=8, lr=lr, warmup_steps=3, grad_accum=2,
                                                  ckpt_every=ckpt_every, keep_last=keep_last, log_every=1,
                                                  device="cpu", seed=7), **train)}

    def make(run_dir, resume=None, fingerprint="teacher-a", loader=False, **kw):
        cfg = config(**kw)
        teacher, student = TwoTower(24, 0.0, 1), TwoTower(16, 0.2, 2)
        losses = build_losses([{"name": "affinity"}, {"name": "clip", "weight": 0.3}])
        data = DataLoader(Data(), batch_size=8, shuffle=False) if loader else Data()
        return Distiller(student, losses, data, TrainConfig(**cfg["train"]), run_dir, teacher=teacher,
                         config=cfg, teacher_fingerprint=fingerprint, resume=resume, progress=False)

    if __name__ == "__main__":
        make(sys.argv[1], steps=int(sys.argv[2])).fit()
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("setup") / "train_setup.py"
    path.write_text(SETUP)
    return path, runpy.run_path(str(path))


def full_state(d) -> dict:
    state = d.state_dict()
    return {"model": state["model"], "losses": state["losses"], "opt": state["optimizer"]["state"],
            "step": state["step"], "data": state["data"], "lr": d.optimizer.param_groups[0]["lr"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["data"] == b["data"] and a["lr"] == b["lr"]
    for key in ("model", "losses"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for pid in a["opt"]:
        for k, v in a["opt"][pid].items():
            assert torch.equal(v, b["opt"][pid][k]), f"optimizer state {pid}.{k} differs"


# ---------------------------------------------------------------- atomic writes


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    first = mgr.save({"model": {"w": torch.ones(1000)}, "step": 1}, 1)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])  # half the bytes are out when the "crash" hits
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save({"model": {"w": torch.zeros(1000)}, "step": 2}, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", first.name]
    assert mgr.latest() == first
    assert torch.equal(load_checkpoint(first)["model"]["w"], torch.ones(1000))


def test_sigkill_at_any_moment_leaves_valid_checkpoints_and_resume_is_exact(tmp_path, setup):
    script, ns = setup
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), "400"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mgr = CheckpointManager(run_dir / "checkpoints")
    deadline = time.time() + 60
    while (mgr.latest() is None or int(mgr.latest().stem.split("_")[1]) < 5) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    time.sleep(random.Random(0).uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    steps = mgr.steps()
    assert steps, "no checkpoint survived"
    # What a kill during a write leaves behind (the kill above may or may not have hit one): a temp file.
    (mgr.folder / f".step_{steps[-1] + 1:07d}.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert mgr.latest() == mgr.folder / f"step_{steps[-1]:07d}.pt"
    for step in steps:  # every checkpoint file on disk is complete
        assert load_checkpoint(mgr.folder / f"step_{step:07d}.pt")["step"] == step

    # Continue the killed run a few steps and compare with a run that was never killed.
    until = steps[-1] + 4
    resumed = ns["make"](run_dir, resume="latest", steps=400)
    resumed.fit(until=until)
    assert not list(mgr.folder.glob(".*.tmp")), "stale temp files were not cleaned"
    straight = ns["make"](tmp_path / "straight", steps=400, ckpt_every=0)
    straight.fit(until=until)
    assert_same(full_state(resumed), full_state(straight))


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("loader", [False, True], ids=["dataset", "dataloader"])
def test_resume_equals_uninterrupted(tmp_path, setup, loader):
    _, ns = setup
    kw = dict(steps=9, ckpt_every=3, keep_last=0, loader=loader)
    straight = ns["make"](tmp_path / "a", **kw)
    straight.fit()

    first = ns["make"](tmp_path / "b", **kw)
    first.fit(until=5)  # stops after step 5 and checkpoints it
    assert CheckpointManager(tmp_path / "b" / "checkpoints").steps() == [3, 5]
    second = ns["make"](tmp_path / "b", resume="latest", **kw)
    second.fit()
    assert_same(full_state(second), full_state(straight))

    if not loader:  # resuming from an older explicit checkpoint replays the same trajectory too
        third = ns["make"](tmp_path / "b", resume=tmp_path / "b" / "checkpoints" / "step_0000003.pt", **kw)
        third.fit()
        assert_same(full_state(third), full_state(straight))

    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a")}
    b = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b")}
    assert a == b


def test_interrupt_saves_last_completed_step_and_resume_is_exact(tmp_path, setup):
    _, ns = setup
    straight = ns["make"](tmp_path / "a", steps=6, ckpt_every=0)
    straight.fit()

    d = ns["make"](tmp_path / "b", steps=6, ckpt_every=0)
    affinity = d.losses.losses[0]
    calls = {"n": 0}
    real_forward = affinity.forward

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # 2 micro-batches per step: Ctrl-C arrives inside step 4
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    affinity.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        d.fit()
    assert CheckpointManager(tmp_path / "b" / "checkpoints").steps() == [3]
    resumed = ns["make"](tmp_path / "b", resume="latest", steps=6, ckpt_every=0)
    resumed.fit()
    assert_same(full_state(resumed), full_state(straight))


def test_resume_latest_without_checkpoints_is_an_error_auto_starts_fresh(tmp_path, setup):
    _, ns = setup
    with pytest.raises(CheckpointError, match="nothing to resume in") as info:
        ns["make"](tmp_path / "a", resume="latest", steps=2).fit()
    assert str(tmp_path / "a") in str(info.value) and "leave out --resume" in str(info.value)
    assert not CheckpointManager(tmp_path / "a" / "checkpoints").steps()

    assert ns["make"](tmp_path / "b", resume="auto", steps=2).fit()["step"] == 2  # nothing there: a new run
    again = ns["make"](tmp_path / "b", resume="auto", steps=3)
    assert again.fit()["step"] == 3 and again.saved_step == 3  # something there: it continues
    assert [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r] == [1, 2, 3]


# ---------------------------------------------------------------- refusing the wrong resume


def test_teacher_fingerprint_mismatch_errors(tmp_path, setup):
    _, ns = setup
    ns["make"](tmp_path, steps=2).fit()
    with pytest.raises(CheckpointError) as info:
        ns["make"](tmp_path, resume="latest", fingerprint="teacher-b", steps=4).fit()
    assert "teacher-a" in str(info.value) and "teacher-b" in str(info.value)


def test_incompatible_config_names_the_differences(tmp_path, setup):
    _, ns = setup
    ns["make"](tmp_path, steps=2).fit()
    with pytest.raises(CheckpointError) as info:
        ns["make"](tmp_path, resume="latest", steps=4, lr=0.02, seed=8).fit()
    assert "train.seed: 7 → 8" in str(info.value)
    assert "steps" not in str(info.value) and "train.lr" not in str(info.value)  # these may change


def test_resume_may_change_lr_warmup_clip_and_precision(tmp_path, setup, caplog):
    """The advice after a non-finite loss (lower train.lr, then resume) can be followed, and takes effect."""
    _, ns = setup
    ns["make"](tmp_path, steps=4, ckpt_every=0, clip_grad_norm=1.0, precision="auto").fit(until=2)
    changed = dict(lr=0.001, warmup_steps=5, clip_grad_norm=0.5, precision="fp32")
    with caplog.at_level("WARNING", logger="xmodal"):
        d = ns["make"](tmp_path, resume="latest", steps=4, ckpt_every=0, **changed)
        d.fit(until=3)
    warned = " ".join(r.getMessage() for r in caplog.records if "changed training settings" in r.getMessage())
    for line in ("train.lr: 0.01 → 0.001", "train.warmup_steps: 3 → 5", "train.clip_grad_norm: 1.0 → 0.5",
                 'train.precision: "auto" → "fp32"'):
        assert line in warned
    from xmodal.engine import WarmupCosine

    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path) if "lr" in r}
    assert lrs[3] == pytest.approx(0.001 * WarmupCosine(4, 5)(2))  # the new rate and warmup, from the resumed step
    assert d.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * WarmupCosine(4, 5)(3))


def test_config_differences_rules():
    old = {"train": {"lr": 1.0, "steps": 5}, "student": {"width": 8}, "resume": None}
    new = {"train": {"lr": 1.0, "steps": 9}, "student": {"width": 16, "depth": 2}, "resume": "latest"}
    assert config_differences(old, new) == ["student.depth: (absent) → 2", "student.width: 8 → 16"]
    assert config_differences(old, new, may_change=["student.*", "steps", "resume"]) == []


# ---------------------------------------------------------------- file safety


def test_load_refuses_corrupt_truncated_and_unsafe_files(tmp_path):
    good = save_checkpoint({"model": {"w": torch.arange(1000.0)}, "step": 3}, tmp_path / "good.pt")
    assert load_checkpoint(good)["step"] == 3

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "step": 1, "payload": CheckpointManager(tmp_path)}, unsafe)  # arbitrary object
    for path in (truncated, garbage, unsafe):
        with pytest.raises(CheckpointError, match=path.name) as info:
            load_checkpoint(path)
        # never torch's advice to load it unsafely, neither in the message nor in the chained traceback
        shown = "".join(traceback.format_exception(info.value))
        assert "weights_only" not in str(info.value)
        assert not any(advice in shown for advice in ("likely succeed", "Weights only load failed", "trusted source"))
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable checkpoint \(UnpicklingError: "
                                              r"Unsupported operand"):
        load_checkpoint(garbage)  # a corrupt file, not called unsafe
    with pytest.raises(CheckpointError, match=r"unsafe\.pt: refused to load this checkpoint: .* \(it asks for "
                                              r"xmodal\.engine\.checkpoint\.CheckpointManager\)"):
        load_checkpoint(unsafe)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_keep_last_prunes_and_latest_points_to_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        mgr.save({"model": {}, "step": step}, step)
    assert mgr.steps() == [4, 5]
    assert (tmp_path / "latest").read_text().strip() == "step_0000005.pt"
    assert mgr.resolve("latest") == tmp_path / "step_0000005.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.resolve(tmp_path / "step_0000001.pt")


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({"model": {}, "step": 0, "rng": capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------- checksums


def test_every_single_byte_flip_is_caught_naming_the_file(tmp_path):
    state = {"model": {"w": torch.randn(4000), "b": torch.zeros(8)}, "step": 3, "rng": capture_rng()}
    good = save_checkpoint(state, tmp_path / "step_0000003.pt")
    data = good.read_bytes()
    assert load_checkpoint(good)["step"] == 3
    for k in range(1, 6):  # headers, pickled metadata and tensor bytes alike
        at = len(data) * k // 6
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        path = tmp_path / f"flip{k}.pt"
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"{path.name} is damaged: its blake2b checksum"):
            load_checkpoint(path)
    (tmp_path / "cut.pt").write_bytes(data[:-1])  # the trailer itself damaged
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")


def flip_tensor_byte(path) -> None:
    """Flip one byte in the middle of the largest tensor of a torch file: it still loads (torch reads tensor bytes
    unchecked), so only the checksum can tell."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_other_torch_files_load_and_are_verified_when_checksummed(tmp_path):
    """`training_only=False` (model files, bare state dicts): a file with a trailer is still verified, and a
    training checkpoint still needs one."""
    plain = tmp_path / "model.pt"
    torch.save({"kind": "x", "model": {"w": torch.ones(3)}}, plain)
    assert load_checkpoint(plain, training_only=False)["kind"] == "x"
    with pytest.raises(CheckpointError, match="not an xmodal training checkpoint"):
        load_checkpoint(plain)
    checked = save_checkpoint({"model": {"w": torch.arange(4000.0)}, "step": 2}, tmp_path / "step_0000002.pt")
    assert load_checkpoint(checked, training_only=False)["step"] == 2
    flip_tensor_byte(checked)
    assert torch.load(checked, weights_only=True)["step"] == 2  # torch alone would not notice
    with pytest.raises(CheckpointError, match="step_0000002.pt is damaged: its blake2b checksum"):
        load_checkpoint(checked, training_only=False)
    untrailed = tmp_path / "cut.pt"
    torch.save({"format": 2, "model": {}, "step": 1}, untrailed)
    with pytest.raises(CheckpointError, match="cut.pt is damaged: its checksum trailer is missing"):
        load_checkpoint(untrailed, training_only=False)


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, setup, caplog):
    _, ns = setup
    kw = dict(steps=6, ckpt_every=1, keep_last=0)
    straight = ns["make"](tmp_path / "a", **kw)
    straight.fit()

    ns["make"](tmp_path / "b", **kw).fit(until=4)
    folder = tmp_path / "b" / "checkpoints"
    newest = folder / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # e.g. a copy cut short
    with pytest.raises(CheckpointError, match="step_0000004.pt"):  # an explicit path never falls back
        ns["make"](tmp_path / "b", resume=newest, **kw).fit()

    with caplog.at_level("WARNING", logger="xmodal"):
        resumed = ns["make"](tmp_path / "b", resume="latest", **kw)
        resumed.fit()
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step_0000004.pt" in warnings and "resuming from step_0000003.pt" in warnings
    assert (folder / "step_0000004.pt.damaged").is_file()  # kept for inspection, out of resume's way
    assert_same(full_state(resumed), full_state(straight))
    assert CheckpointManager(folder).steps() == [1, 2, 3, 4, 5, 6]


def test_settings_added_since_a_checkpoint_resume_when_left_at_their_default():
    """A checkpoint written before a config key existed resumes under a config that leaves that key at its
    default; a non-default value, or a key absent from a plain-dict config, is still a difference."""
    from dataclasses import dataclass, field

    @dataclass
    class Data:
        train: str = "train.csv"
        shards: str | None = None  # added later
        image_keys: list = field(default_factory=lambda: ["jpg", "png"])  # added later

    @dataclass
    class Job:
        data: Data = field(default_factory=Data)
        steps: int = 5

    old = {"data": {"train": "train.csv"}, "steps": 5}
    assert config_differences(old, Job()) == []
    assert config_differences(old, Job(data=Data(shards="s-{0..3}.tar"))) == ['data.shards: (absent) → "s-{0..3}.tar"']
    assert config_differences(old, Job(data=Data(image_keys=["webp"]))) == ['data.image_keys: (absent) → ["webp"]']
    assert config_differences(old, {"data": {"train": "train.csv", "shards": None}, "steps": 5}) == [
        "data.shards: (absent) → null"]

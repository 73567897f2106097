"""Run safety: BatchNorm state around failures, one writer per run folder, work kept on errors, checksums,
resume rules, and progress lines when the output is not a terminal."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.config import TrainConfig
from xmodal.engine import CheckpointManager, Distiller, NonFiniteLossError, load_checkpoint, read_metrics
from xmodal.errors import DataError
from xmodal.features import Features
from xmodal.lock import LockedError
from xmodal.losses import LOSSES, DistillLoss, LossOutput, LossSet


class PairData(Dataset):
    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.image, self.text = torch.randn(n, 12, generator=g), torch.randn(n, 10, generator=g)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"s{i}", "image": self.image[i], "text": self.text[i]}


class BNTower(nn.Module):
    """Two towers with BatchNorm; `poison(n, where)` feeds inf into the n-th forward pass (the main path, whose
    output the loss reads, or an auxiliary BatchNorm whose output nothing reads)."""

    def __init__(self, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 16))
        self.text = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16))
        self.aux = nn.BatchNorm1d(12)
        self.calls, self.poison_at, self.where = 0, None, None

    def poison(self, at: int, where: str = "main") -> BNTower:
        self.poison_at, self.where = at, where
        return self

    def forward(self, batch) -> dict[str, Features]:
        self.calls += 1
        x = batch["image"]
        bad = self.calls == self.poison_at
        if bad and self.where == "main":
            x = x * float("inf")
        self.aux(batch["image"] * float("inf") if bad and self.where == "aux" else batch["image"])
        return {"image": Features(self.image(x)), "text": Features(self.text(batch["text"]))}


class Hook(DistillLoss):
    """A zero loss that runs `action` on its n-th call (after the student's forward pass)."""

    name = "hook"

    def __init__(self, at: int | None = None, action=None):
        super().__init__()
        self.at, self.action, self.calls = at, action, 0

    def forward(self, student, teacher=None, batch=None) -> LossOutput:
        self.calls += 1
        if self.calls == self.at:
            self.action()
        return LossOutput(student["image"].pooled.sum() * 0.0)


def losses(hook: Hook | None = None) -> LossSet:
    return LossSet([("clip", 1.0, LOSSES.build("clip")), ("hook", 1.0, hook or Hook())])


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, seed=0, device="cpu", grad_accum=2)
    return TrainConfig(**{**base, **kw})


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ---------------------------------------------------------------- BatchNorm state around a failing step


def test_non_finite_step_leaves_batchnorm_statistics_out_of_the_last_good_checkpoint(tmp_path):
    reference = BNTower()  # the same run, stopped cleanly after step 2: the state the failure must keep
    Distiller(reference, losses(), PairData(), cfg(steps=6), tmp_path / "ref", progress=False).fit(until=2)
    before = buffers(reference)

    student = BNTower().poison(5)  # the first forward pass of step 3 (2 micro-batches per step) diverges
    with pytest.raises(NonFiniteLossError) as info:
        Distiller(student, losses(), PairData(), cfg(steps=6), tmp_path / "run", progress=False).fit()
    assert info.value.step == 3 and info.value.checkpoint == tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    saved = load_checkpoint(info.value.checkpoint)["model"]
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert_states_equal({k: saved[k] for k in before}, before)  # on disk and in memory
    assert_states_equal(buffers(student), before)


def test_non_finite_batchnorm_statistics_alone_stop_training(tmp_path):
    """The loss and gradients stay finite; only a buffer goes NaN. That is caught too, naming the buffer."""
    student = BNTower().poison(5, "aux")  # step 3's first micro-batch (2 per step)
    with pytest.raises(NonFiniteLossError) as info:
        Distiller(student, losses(), PairData(), cfg(steps=6), tmp_path, progress=False).fit()
    err = info.value
    assert err.step == 3 and "buffer 'student.aux.running_mean'" in str(err)
    ckpt = load_checkpoint(err.checkpoint)
    assert ckpt["step"] == 2 and torch.isfinite(ckpt["model"]["aux.running_mean"]).all()
    assert torch.isfinite(student.aux.running_var).all()


def test_interrupt_mid_step_resumes_batchnorm_statistics_exactly(tmp_path):
    def make(folder, hook=None, resume=None):
        return Distiller(BNTower(), losses(hook), PairData(), cfg(steps=6), folder, resume=resume, progress=False)

    straight = make(tmp_path / "a")
    straight.fit()

    def interrupt():
        raise KeyboardInterrupt

    # Call 8 of the hook is the second micro-batch of step 4: both forward passes of step 4 moved the statistics.
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "b", Hook(8, interrupt)).fit()
    assert CheckpointManager(tmp_path / "b" / "checkpoints").steps() == [3]
    resumed = make(tmp_path / "b", resume="latest")
    resumed.fit()
    assert_states_equal(resumed.objective.state_dict(), straight.objective.state_dict())


# ---------------------------------------------------------------- errors keep the work done so far


def test_error_mid_training_saves_last_completed_step_and_resume_is_exact(tmp_path):
    def make(folder, hook=None, resume=None):
        return Distiller(BNTower(), losses(hook), PairData(), cfg(steps=8), folder, resume=resume, progress=False)

    straight = make(tmp_path / "a")
    straight.fit()

    def bad_batch():
        raise DataError("sample s3: transcript has a character outside the vocabulary")

    with pytest.raises(DataError, match="outside the vocabulary"):
        make(tmp_path / "b", Hook(11, bad_batch)).fit()  # inside step 6
    assert CheckpointManager(tmp_path / "b" / "checkpoints").steps() == [5]
    resumed = make(tmp_path / "b", resume="latest")
    resumed.fit()
    assert_states_equal(resumed.objective.state_dict(), straight.objective.state_dict())
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 9))


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    kw = dict(steps=6, ckpt_every=3, keep_last=0)
    Distiller(BNTower(), losses(), PairData(), cfg(**kw), tmp_path, progress=False).fit()
    ckpt = tmp_path / "checkpoints" / "step_0000003.pt"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.0')  # and a line cut short by a crash
    Distiller(BNTower(), losses(), PairData(), cfg(**kw), tmp_path, resume=ckpt, progress=False).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_gradient_norm_without_torch_2_6_helpers(tmp_path, monkeypatch):
    """setup.cfg allows torch 2.4: the engine must not need torch.nn.utils.get_total_norm (new in 2.6)."""
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    student = BNTower()
    d = Distiller(student, losses(), PairData(), cfg(steps=1, grad_accum=1, clip_grad_norm=None), tmp_path,
                  progress=False)
    result = d.fit()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in d.params if p.grad is not None]))
    assert result["grad_norm"] == pytest.approx(float(expected), rel=1e-5)


def test_without_a_terminal_progress_is_a_log_line_every_log_every_steps(tmp_path, caplog):
    """With output captured (as here under pytest, or `| tee`, or a scheduler log) tqdm shows no bar."""
    assert not sys.stderr.isatty()
    with caplog.at_level("INFO", logger="xmodal"):
        Distiller(BNTower(), losses(), PairData(), cfg(steps=6, log_every=2), tmp_path).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss " in line and " lr " in line and "samples/s" in line and "ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")


# ---------------------------------------------------------------- one writer per run folder

HOLD = "import sys; from xmodal.lock import FolderLock; lock = FolderLock(sys.argv[1], 'run folder').acquire(); " \
       "print('held', flush=True); sys.stdin.read()"


def _env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def test_engine_refuses_a_run_folder_another_process_holds(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(LockedError) as info:
            Distiller(BNTower(), losses(), PairData(), cfg(steps=2), tmp_path, progress=False).fit()
        assert f"process {holder.pid} on" in str(info.value) and "run folder" in str(info.value)
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file stays, and the next run takes it over.
    assert Distiller(BNTower(), losses(), PairData(), cfg(steps=2), tmp_path, progress=False).fit()["step"] == 2


TOY_JOB = textwrap.dedent('''
    """A tiny job for command-line tests: `python toy_job.py distill CONFIG` runs xmodal's CLI with it."""
    import sys
    import time
    from dataclasses import dataclass, field

    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from xmodal.config import JOBS, TrainConfig, register_job
    from xmodal.features import Features

    class Data(Dataset):
        def __init__(self, delay):
            g = torch.Generator().manual_seed(0)
            self.x, self.y, self.delay = torch.randn(32, 12, generator=g), torch.randn(32, 10, generator=g), delay
        def __len__(self):
            return 32
        def __getitem__(self, i):
            time.sleep(self.delay)
            return {"id": f"s{i}", "image": self.x[i], "text": self.y[i]}

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = nn.Linear(12, 8), nn.Linear(10, 8)
        def forward(self, batch):
            return {"image": Features(self.image(batch["image"])), "text": Features(self.text(batch["text"]))}

    @dataclass
    class ToyConfig:
        run_dir: str
        train: TrainConfig = field(default_factory=TrainConfig)
        resume: str | None = None
        delay: float = 0.0

    def run(cfg):
        from xmodal.engine import Distiller
        from xmodal.losses import build_losses
        torch.manual_seed(0)
        return Distiller(Tower(), build_losses([{"name": "clip"}]), Data(cfg.delay), cfg.train, cfg.run_dir,
                         config=cfg, resume=cfg.resume).fit()

    if "toy_run_safety" not in JOBS:
        register_job("toy_run_safety", ToyConfig, help="a tiny test job")(run)

    if __name__ == "__main__":
        from xmodal.cli import main
        sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def toy_job(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy_job.py"
    path.write_text(TOY_JOB)
    runpy.run_path(str(path))  # registers the job in this process too
    return path


def toy_config(folder, name: str, run_dir, **train) -> str:
    path = folder / name
    settings = {"steps": 6, "batch_size": 8, "lr": 0.01, "warmup_steps": 1, "log_every": 2, "device": "cpu",
                **train}
    path.write_text(json.dumps({"job": "toy_run_safety", "run_dir": str(run_dir), "train": settings}))
    return str(path)


def test_two_distill_commands_on_one_run_folder(tmp_path, toy_job):
    """A second `xmodal distill` into a folder in use is refused naming the holder; a dead holder's lock is taken
    over; with output captured (not a terminal) training prints a progress line every log_every steps."""
    run_dir = tmp_path / "run"
    slow = toy_config(tmp_path, "slow.yaml", run_dir, steps=100000)
    fast = toy_config(tmp_path, "fast.yaml", run_dir, steps=6)
    first = subprocess.Popen([sys.executable, str(toy_job), "distill", slow, "--set", "delay=0.02"], env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        lock = run_dir / ".lock"
        while not (lock.is_file() and lock.read_text().startswith(f"{first.pid} ")):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, str(toy_job), "distill", fast], env=_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"run folder {run_dir} is in use by process {first.pid}" in second.stderr
        assert first.poll() is None  # the refused run did not disturb the running one
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    third = subprocess.run([sys.executable, str(toy_job), "distill", fast], env=_env(), capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock left by {first.pid}" in third.stderr
    lines = [line for line in third.stderr.splitlines() if " step " in f" {line}" and "ETA" in line]
    assert [line.split("step ")[1].split()[0] for line in lines] == ["2/6", "4/6", "6/6"], third.stderr
    assert all("loss " in line and "lr " in line and "samples/s" in line for line in lines)
    assert third.stdout == ""  # progress goes to stderr, like the bar
    assert [r["step"] for r in read_metrics(run_dir)] == [2, 4, 6]  # the killed attempt's rows are gone


def test_resume_with_nothing_to_resume_is_an_error(tmp_path, toy_job, capsys):
    from xmodal.cli import main

    config = toy_config(tmp_path, "job.yaml", tmp_path / "new", steps=2)
    assert main(["distill", config, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"nothing to resume in {tmp_path / 'new'}" in err and "leave out --resume" in err
    assert not CheckpointManager(tmp_path / "new" / "checkpoints").steps()
    assert main(["distill", config]) == 0  # what the message says to do


def test_locked_error_survives_pickling_with_its_holder():
    """A refusal raised in a worker process (a process pool, a spawned rank) reaches the parent as itself,
    not as a TypeError from re-creating the exception without its holder."""
    import pickle

    from xmodal.lock import LockedError

    err = pickle.loads(pickle.dumps(LockedError("run folder /x is in use by process 12@host", "12@host")))
    assert isinstance(err, LockedError) and err.holder == "12@host"
    assert str(err) == "run folder /x is in use by process 12@host"

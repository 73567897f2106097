"""The distillation loop: schedule, frozen teacher, logging, evaluation, accumulation, NaN handling, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.config import TrainConfig
from xmodal.engine import (
    Distiller,
    NonFiniteLossError,
    ResumableBatchSampler,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    collate_samples,
    load_checkpoint,
    read_metrics,
    to_device,
)
from xmodal.errors import CheckpointError, ConfigError, XmodalError
from xmodal.features import Features
from xmodal.losses import DistillLoss, LossOutput, LossSet, build_losses
from xmodal.losses.feature import FeatureMSE


class PairData(Dataset):
    """Seeded random (image, text) vectors with string ids."""

    def __init__(self, n: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 12, generator=g)
        self.text = torch.randn(n, 10, generator=g)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"s{i}", "image": self.image[i], "text": self.text[i]}


class TwoTower(nn.Module):
    """Image and text linear towers returning aligned pooled Features."""

    def __init__(self, width: int, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Sequential(nn.Linear(12, width), nn.Dropout(dropout))
        self.text = nn.Linear(10, width)
        self.seen_inference_mode: list[bool] = []
        self.seen_dtype: list[torch.dtype] = []

    def forward(self, batch) -> dict[str, Features]:
        self.seen_inference_mode.append(torch.is_inference_mode_enabled())
        img = self.image(batch["image"])
        self.seen_dtype.append(img.dtype)
        return {"image": Features(img), "text": Features(self.text(batch["text"]))}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, seed=0, device="cpu")
    return TrainConfig(**{**base, **kw})


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- schedule and optimizer


def test_warmup_cosine_values():
    f = WarmupCosine(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(2, 12))
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        WarmupCosine(10, 0, 1.5)


def test_scheduler_drives_optimizer_lr_and_decay_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    c = cfg(steps=4, warmup_steps=2, lr=0.1, weight_decay=0.2)
    opt = build_optimizer([model], c)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].weight)] == 0.2
    assert decays[id(model[0].bias)] == 0.0 and decays[id(model[1].weight)] == 0.0
    sched = build_scheduler(opt, c)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    f = WarmupCosine(4, 2, 0.0)
    assert lrs == pytest.approx([0.1 * f(s) for s in range(4)])


# ---------------------------------------------------------------- the loop


def test_fit_trains_student_with_frozen_teacher(tmp_path):
    teacher, student = TwoTower(24, seed=1), TwoTower(16, dropout=0.1, seed=2)
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = build_losses([{"name": "affinity"}, {"name": "clip", "weight": 0.5}])
    d = Distiller(student, losses, PairData(), cfg(steps=12, ckpt_every=6), tmp_path / "run", teacher=teacher,
                  config={"train": {"lr": 0.01}}, teacher_fingerprint="fp", progress=False)
    opt_params = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert id(losses.losses[1].scale.log_scale) in opt_params  # learnable temperature trains too
    result = d.fit()

    assert state_equal(before, teacher.state_dict())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.seen_inference_mode and all(teacher.seen_inference_mode)
    assert student.seen_inference_mode and not any(student.seen_inference_mode)

    records = read_metrics(tmp_path / "run")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("lr", "loss/affinity", "loss/affinity/a2b", "loss/clip", "grad_norm", "samples_per_s", "epoch"):
        assert key in train[0]
    assert train[-1]["loss/affinity"] < train[0]["loss/affinity"]
    assert [r["lr"] for r in train] == pytest.approx([0.01 * WarmupCosine(12, 1)(s) for s in range(12)])
    assert result["step"] == 12 and result["loss"] == train[-1]["loss"]
    assert (tmp_path / "run" / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_0000006.pt", "step_0000012.pt"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000012.pt"


def test_evaluator_logged_and_does_not_disturb_training_rng(tmp_path):
    calls = []

    def evaluator(model):
        calls.append((model.training, torch.is_grad_enabled()))
        torch.rand(100)  # consumes RNG: must not change the training trajectory
        return {"score": float(len(calls))}

    def run(folder, ev):
        student = TwoTower(16, dropout=0.3, seed=2)
        d = Distiller(student, build_losses([{"name": "clip"}]), PairData(), cfg(steps=5, eval_every=2),
                      folder, evaluator=ev, progress=False)
        return d.fit(), student

    result, with_eval = run(tmp_path / "a", evaluator)
    _, without = run(tmp_path / "b", None)
    assert state_equal(with_eval.state_dict(), without.state_dict())
    assert calls == [(False, False)] * 3  # steps 2, 4 and the final step 5
    assert with_eval.training
    evals = [r for r in read_metrics(tmp_path / "a") if "eval/score" in r]
    assert [(r["step"], r["eval/score"]) for r in evals] == [(2, 1.0), (4, 2.0), (5, 3.0)]
    assert result["eval/score"] == 3.0


def test_grad_accumulation_matches_large_batch(tmp_path):
    def run(folder, batch, accum):
        teacher, student = TwoTower(16, seed=1), TwoTower(16, seed=2)
        losses = build_losses([{"name": "feature_mse"}])
        c = cfg(steps=3, batch_size=batch, grad_accum=accum, clip_grad_norm=None)
        Distiller(student, losses, PairData(), c, folder, teacher=teacher, progress=False).fit()
        return student.state_dict()

    big = run(tmp_path / "big", 8, 1)
    accumulated = run(tmp_path / "acc", 4, 2)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-5, atol=1e-6)


class BreakAt(DistillLoss):
    """Adds NaN on the n-th call (or a loss whose gradient is NaN when `grad=True`)."""

    name = "break"

    def __init__(self, at: int, grad: bool = False):
        super().__init__()
        self.at, self.grad, self.calls = at, grad, 0

    def forward(self, student, teacher=None, batch=None) -> LossOutput:
        self.calls += 1
        x = student["image"].pooled
        if self.calls < self.at:
            return LossOutput(x.sum() * 0.0)
        if self.grad:  # finite value, NaN gradient: d sqrt(u)/du at 0 times 0
            return LossOutput((x * 0.0).sqrt().sum())
        return LossOutput(x.sum() * float("nan"), {"inner": torch.tensor(float("nan"))})


@pytest.mark.parametrize("grad", [False, True])
def test_non_finite_stops_with_step_part_and_last_good_checkpoint(tmp_path, grad):
    teacher, student = TwoTower(16, seed=1), TwoTower(16, seed=2)
    losses = LossSet([("mse", 1.0, FeatureMSE()), ("boom", 1.0, BreakAt(3, grad=grad))])
    d = Distiller(student, losses, PairData(), cfg(steps=6), tmp_path, teacher=teacher, progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        d.fit()
    err = info.value
    assert isinstance(err, XmodalError) and err.step == 3
    message = str(err)
    assert "step 3" in message
    if grad:
        assert "'grad_norm'" in message
    else:
        assert "'loss/boom'" in message and "'loss/boom/inner'" in message and "'loss/mse'" not in message
    assert err.checkpoint == tmp_path / "checkpoints" / "step_0000002.pt" and str(err.checkpoint) in message
    ckpt = load_checkpoint(err.checkpoint)
    assert ckpt["step"] == 2
    assert state_equal(ckpt["model"], student.state_dict())  # the failing step changed nothing
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_no_teacher_and_bf16_autocast(tmp_path):
    student = TwoTower(16, seed=2)
    result = Distiller(student, build_losses([{"name": "clip"}]), PairData(), cfg(steps=3, precision="bf16"),
                       tmp_path, progress=False).fit()
    assert math.isfinite(result["loss"]) and result["step"] == 3
    assert set(student.seen_dtype) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_teacher_sharing_parameters_is_rejected(tmp_path):
    student = TwoTower(16)
    teacher = nn.ModuleDict({"image": student.image})
    with pytest.raises(ConfigError, match="shares parameters"):
        Distiller(student, build_losses([{"name": "clip"}]), PairData(), cfg(), tmp_path, teacher=teacher)
    assert all(p.requires_grad for p in student.parameters())


def test_new_run_refuses_folder_with_checkpoints(tmp_path):
    Distiller(TwoTower(16), build_losses([{"name": "clip"}]), PairData(), cfg(steps=2), tmp_path,
              progress=False).fit()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Distiller(TwoTower(16), build_losses([{"name": "clip"}]), PairData(), cfg(steps=2), tmp_path,
                  progress=False).fit()


def test_wrong_student_output_named(tmp_path):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 4)

        def forward(self, batch):
            return self.lin(batch["image"])

    with pytest.raises(ConfigError, match="dict of modality"):
        Distiller(Bad(), build_losses([{"name": "clip"}]), PairData(), cfg(), tmp_path, progress=False).fit()


# ---------------------------------------------------------------- data plumbing


def test_batch_sampler_ranks_epochs_and_start():
    single = list(ResumableBatchSampler(20, 8, seed=3))
    assert len(single) == 2 and all(len(b) == 8 for b in single)
    halves = [list(ResumableBatchSampler(20, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == single  # ranks together see the single-process batches
    s = ResumableBatchSampler(20, 8, seed=3)
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != single
    s.set_epoch(1, start=1)
    assert list(s) == epoch1[1:]
    with pytest.raises(ConfigError, match="divisible"):
        ResumableBatchSampler(20, 7, world_size=2)


def test_collate_and_to_device():
    batch = collate_samples([PairData()[0], PairData()[1]])
    assert batch["ids"] == ["s0", "s1"] and "id" not in batch and batch["image"].shape == (2, 12)
    nested = {"a": [torch.ones(2), (torch.zeros(1), "x")], "f": Features(torch.ones(2, 3)), "n": 3}
    moved = to_device(nested, torch.device("cpu"))
    assert isinstance(moved["f"], Features) and moved["a"][1][1] == "x" and moved["n"] == 3


def test_metrics_jsonl_is_valid_json_lines(tmp_path):
    Distiller(TwoTower(16), build_losses([{"name": "clip"}]), PairData(), cfg(steps=4, log_every=2), tmp_path,
              progress=False).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


@pytest.mark.parametrize("clip", [1.0, None])
def test_non_finite_advice_names_only_what_applies(tmp_path, clip):
    student = TwoTower(16, seed=2)
    losses = LossSet([("mse", 1.0, FeatureMSE()), ("boom", 1.0, BreakAt(3))])
    d = Distiller(student, losses, PairData(), cfg(steps=6, clip_grad_norm=clip, precision="fp32"), tmp_path,
                  teacher=TwoTower(16, seed=1), progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        d.fit()
    message = str(info.value)
    assert "lower train.lr (now 0.01)" in message.lower() and "--resume" in message
    assert ("set train.clip_grad_norm" in message) == (clip is None)  # already set: not suggested
    assert "precision" not in message.split("resume with")[0]  # fp32 already: not suggested


def test_non_finite_at_the_first_step_says_there_is_nothing_to_resume(tmp_path):
    losses = LossSet([("mse", 1.0, FeatureMSE()), ("boom", 1.0, BreakAt(1))])
    d = Distiller(TwoTower(16, seed=2), losses, PairData(), cfg(steps=6), tmp_path, teacher=TwoTower(16, seed=1),
                  progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        d.fit()
    assert info.value.checkpoint is None and "no step was completed" in str(info.value)
    assert "start the run again" in str(info.value) and not list((tmp_path / "checkpoints").glob("step_*.pt"))

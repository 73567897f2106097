"""`train.report_to: [tensorboard]`: every numeric key of every metrics.jsonl record becomes a TensorBoard scalar at
the record's step (rank 0, run_dir/tensorboard/), a resume keeps one value per step, and a missing package or an
unknown reporter is a ConfigError naming train.report_to."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from _pairs import PairData
from torch import nn

from xmodal.config import TrainConfig, from_dict
from xmodal.engine import Distiller, read_metrics
from xmodal.engine.run import numeric_scalars
from xmodal.errors import ConfigError
from xmodal.features import Features
from xmodal.losses import build_losses


class TwoTower(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.image, self.text = nn.Linear(12, 8), nn.Linear(10, 8)

    def forward(self, batch) -> dict[str, Features]:
        return {"image": Features(self.image(batch["image"])), "text": Features(self.text(batch["text"]))}


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=1, log_every=1, seed=0, device="cpu",
                report_to=["tensorboard"])
    return TrainConfig(**{**base, **kw})


def distiller(run_dir, cfg: TrainConfig, **kw) -> Distiller:
    return Distiller(TwoTower(), build_losses([{"name": "clip"}]), PairData(), cfg, run_dir,
                     evaluator=lambda model: {"score": 0.5}, progress=False, **kw)


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] as TensorBoard reads the run's event files (restarts purge replayed steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """The same from metrics.jsonl: every numeric key but step and time, as float32 (TensorBoard's precision)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):
        for key, value in numeric_scalars(record).items():
            out.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return out


def test_scalars_equal_metrics_jsonl(tmp_path):
    run_dir = tmp_path / "run"
    distiller(run_dir, train_cfg(eval_every=3)).fit()
    scalars = read_scalars(run_dir)
    expected = expected_scalars(run_dir)
    assert {"loss", "loss/clip", "lr", "grad_norm", "samples_per_s", "epoch", "eval/score"} <= set(expected)
    assert scalars == expected
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in scalars["eval/score"]] == [3, 6]


def test_resume_keeps_one_value_per_step(tmp_path):
    run_dir = tmp_path / "run"
    distiller(run_dir, train_cfg(ckpt_every=3, keep_last=5), config={"train": {"lr": 1e-2}}).fit()
    (run_dir / "checkpoints" / "step_0000006.pt").unlink()  # as if killed after logging steps 4-6
    first = read_scalars(run_dir)["loss"]
    # resume at step 3 with another learning rate: steps 4-6 are trained again, to other values
    distiller(run_dir, train_cfg(lr=5e-2, ckpt_every=3, keep_last=5), config={"train": {"lr": 5e-2}},
              resume="latest").fit()
    scalars = read_scalars(run_dir)
    assert scalars == expected_scalars(run_dir)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert scalars["loss"][:3] == first[:3] and scalars["loss"][3:] != first[3:]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not rewritten


def test_turning_tensorboard_on_at_resume_is_allowed(tmp_path):
    run_dir = tmp_path / "run"
    distiller(run_dir, train_cfg(steps=2, report_to=[]), config={"train": {"report_to": []}}).fit()
    assert not (run_dir / "tensorboard").exists()  # off by default: nothing written
    distiller(run_dir, train_cfg(steps=4), config={"train": {"report_to": ["tensorboard"]}}, resume="latest").fit()
    assert [s for s, _ in read_scalars(run_dir)["loss"]] == [3, 4]


def test_missing_package_is_a_config_error_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    with pytest.raises(ConfigError) as info:
        distiller(tmp_path / "run", train_cfg())
    message = str(info.value)
    assert "train.report_to" in message and "pip install 'xmodal[tensorboard]'" in message
    assert not (tmp_path / "run").exists()
    distiller(tmp_path / "plain", train_cfg(steps=1, report_to=[])).fit()  # without report_to it is not needed


@dataclass
class JobConfig:
    train: TrainConfig = field(default_factory=TrainConfig)


def test_unknown_value_names_key_and_valid_values(tmp_path):
    with pytest.raises(ConfigError) as info:
        from_dict(JobConfig, {"train": {"report_to": ["tensorboard", "tensorbord"]}}, source="run.yaml")
    message = str(info.value)
    assert "run.yaml" in message and "'train.report_to[1]'" in message and "tensorbord" in message
    assert "did you mean 'tensorboard'" in message and "valid values: tensorboard" in message
    assert from_dict(JobConfig, {"train": {"report_to": ["tensorboard"]}}).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"train.report_to: unknown metrics reporter .*'wandb'"):
        distiller(tmp_path / "run", train_cfg(report_to=["wandb"]))  # a config built in Python is checked too


def test_numeric_scalars_skip_step_time_bools_and_text():
    record = {"step": 3, "time": 1.5, "loss": 0.25, "epoch": 1, "ok": True, "name": "x", "grad_norm": float("nan")}
    out = numeric_scalars(record)
    assert set(out) == {"loss", "epoch", "grad_norm"} and out["loss"] == 0.25 and out["epoch"] == 1.0


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    from xmodal.engine import run as run_module

    monkeypatch.setattr(run_module, "is_main_process", lambda: False)
    other = run_module.RunDir(tmp_path / "rank1", report_to=["tensorboard"])
    other.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setattr(run_module, "is_main_process", lambda: True)
    main = run_module.RunDir(tmp_path / "rank0", report_to=["tensorboard"])
    main.log({"step": 1, "loss": 1.0})
    main.close()
    assert read_scalars(tmp_path / "rank0") == {"loss": [(1, 1.0)]}

"""`xmodal demo`: phase lines for piped runs, a world per data setting at the teacher's image size."""

from __future__ import annotations

import json
import re

import pytest
import torch

from xmodal.config import apply_overrides, from_dict, to_dict
from xmodal.errors import ConfigError
from xmodal.tasks.clip import demo
from xmodal.tasks.clip.demo import DemoConfig, choose_threads, cpu_threads, demo_data

TINY_TEACHER = ("teacher_cfg={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, layers: 2, width: 64, "
                "head_width: 16}, text_cfg: {context_length: 32, vocab_size: 49408, width: 64, heads: 4, layers: 2}}")
TINY = [TINY_TEACHER, "data_train=48", "data_val=16", "data_test=24", "zeroshot_per_class=1",
        "teacher_train.steps=2", "teacher_train.batch_size=16", "student_train.steps=2",
        "student_train.batch_size=16", "student_train.eval_every=1"]


def tiny_config(tmp_path, *extra: str) -> DemoConfig:
    return from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), [*TINY, f"out={tmp_path}", *extra]))


def test_demo_announces_every_phase_and_its_duration(tmp_path, capsys):
    """A piped run is never silent for a whole phase: each phase prints a line when it starts and when it ends."""
    from xmodal.cli import main

    args = ["demo", "--out", str(tmp_path / "demo")]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    starts = [int(m) for m in re.findall(r"^\[(\d)/5\] ", out, re.M)]
    assert starts == [1, 2, 3, 4, 5]
    assert len(re.findall(r"^ +done in \d+ s \(CPU \d+ s\)$", out, re.M)) == 5
    for name in ("teacher", "distilled", "scratch"):
        assert re.search(rf"^ +{name}: I→T R@1 [\d.]+%, T→I R@1 [\d.]+%, zero-shot top-1 [\d.]+%$", out, re.M)
    assert "| teacher |" in out and "| distilled |" in out and "| scratch |" in out
    assert re.search(r"^took \d+ s \(CPU time \d+ s; CPU, \d+ threads?\)$", out, re.M)
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["wall_s"] > 0 and results["cpu_s"] > 0


def test_other_data_settings_get_their_own_world_at_the_teachers_image_size(tmp_path):
    """Changing a data setting on a re-run generates a new world next to the old one instead of failing on it."""
    _, first = demo_data(tiny_config(tmp_path), progress=False)
    _, second = demo_data(tiny_config(tmp_path, "data_train=40"), progress=False)
    _, again = demo_data(tiny_config(tmp_path), progress=False)
    assert first.train.parent != second.train.parent and again.train == first.train
    for paths, n in ((first, 48), (second, 40)):
        world = json.loads((paths.train.parent / "world.json").read_text())
        assert world["counts"]["train"] == n and world["image_size"] == 32
    assert first.zeroshot is not None and first.zeroshot.is_file()


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine where torch would use 2 threads and the user set no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    def load(value):
        monkeypatch.setattr(demo.os, "getloadavg", lambda: (value, value, value))

    return load


def test_threads_drop_to_one_when_other_jobs_keep_the_cores_busy(two_cores):
    """Two torch threads on a 2-core machine that other jobs share wait on each other and train several times
    slower than one thread; on idle cores the demo keeps torch's default."""
    two_cores(0.1)
    assert choose_threads(0) == 2
    two_cores(1.2)
    assert choose_threads(0) == 1
    two_cores(9.0)
    assert choose_threads(0) == 1
    assert choose_threads(2) == 2  # asked for explicitly
    with pytest.raises(ConfigError, match="threads"):
        choose_threads(-1)


def test_an_explicit_omp_num_threads_is_kept(two_cores, monkeypatch):
    two_cores(9.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(0) == 2


def test_thread_count_is_restored_after_the_demo(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(demo, "choose_threads", lambda requested: 1)
    torch.set_num_threads(2)
    try:
        with cpu_threads(0, "cpu") as note:
            assert torch.get_num_threads() == 1 and "--set threads=2" in note
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

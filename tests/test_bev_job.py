"""The bev_distill job end to end on a tiny scene set: teacher trained and reused, student distilled, results,
`xmodal eval detection`, the teacher cache, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from xmodal.config import JOBS, load_job_config
from xmodal.errors import ConfigError

TINY = {
    "job": "bev_distill",
    "data": {"synthetic": {"train": 8, "val": 4, "test": 4, "seed": 0, "objects": [2, 4], "image_size": [24, 40],
                           "lidar_beams": 8, "lidar_azimuths": 180},
             "grid": {"x_range": [0, 16], "y_range": [-8, 8], "cell": 2.0}},
    "teacher": {"model": {"sensor": "lidar", "channels": 8, "backbone_channels": 8, "head_channels": 8},
                "train": {"steps": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 1, "log_every": 1,
                          "device": "cpu"}},
    "student": {"sensor": "camera", "channels": 8, "backbone_channels": 8, "head_channels": 8, "image_channels": 16,
                "depth": [2.0, 18.0], "depth_bins": 8},
    "train": {"steps": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 1, "log_every": 1, "eval_every": 2,
              "device": "cpu"},
    "eval": {"batch_size": 4},
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bevdata")


def _config(tmp_path: Path, data_root: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"]["root"] = str(data_root)
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path):
    name, cfg = load_job_config(path)
    return JOBS.get(name).run(cfg)


def test_job_end_to_end_then_eval_and_teacher_reuse(tmp_path, data_root, capsys):
    cfg_path = _config(tmp_path, data_root)
    results = _run(cfg_path)
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    for who in ("teacher", "student"):
        assert 0.0 <= saved[who]["mAP"] <= 1.0 and math.isfinite(saved[who]["NDS"])
        assert saved[who]["scenes"] == 4 and saved[who]["nds_formula"].startswith("NDS")
    assert results["train"]["step"] == 2 and "loss/unidistill_feature" in results["train"]
    assert [loss["name"] for loss in saved["losses"]] == ["centerpoint", "unidistill_feature", "unidistill_relation",
                                                          "unidistill_response"]
    teacher_file = Path(saved["teacher_path"])
    assert teacher_file.is_file() and (run / "bev_detector.pt").is_file()

    from xmodal.cli import main

    out_json = tmp_path / "eval.json"
    assert main(["eval", "detection", "--model", str(run), "--data", str(data_root / "test"),
                 "--out", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "4 scenes: mAP" in printed and "NDS = (5*mAP" in printed
    assert json.loads(out_json.read_text())["mAP"] == pytest.approx(saved["student"]["mAP"])

    # a later run in the same folder reuses the trained teacher instead of training it again
    from xmodal.tasks.bev.job import obtain_teacher, resolve_splits

    _, cfg = load_job_config(cfg_path)
    mtime = teacher_file.stat().st_mtime_ns
    again, again_file = obtain_teacher(cfg.teacher, cfg.data, resolve_splits(cfg.data), run, cfg.eval)
    assert again_file == teacher_file and teacher_file.stat().st_mtime_ns == mtime and not again.training

    # a teacher loaded from its file gives the same teacher scores
    loaded = _run(_config(tmp_path / "third", data_root, **{"teacher.model": None, "teacher.train": None,
                                                            "teacher.path": str(teacher_file)}))
    assert loaded["teacher"]["mAP"] == pytest.approx(saved["teacher"]["mAP"])


def test_presets_are_valid_and_the_response_preset_trains_only_that_term(tmp_path, data_root):
    from xmodal.tasks.bev.config import LOSS_PRESETS

    for name, make in LOSS_PRESETS.items():
        for k, spec in enumerate(make()):
            spec.check_config(f"preset {name}", f"losses[{k}]")
    # UniDistill's code softens the teacher's heatmap logits by 2 before the sigmoid
    response = [s for s in LOSS_PRESETS["camera_from_lidar"]() if s.name == "unidistill_response"]
    assert [(s.weight, s.params) for s in response] == [(10.0, {"temperature": 2.0})]

    res = _run(_config(tmp_path, data_root, preset="camera_from_lidar_response"))
    assert [loss["name"] for loss in res["losses"]] == ["centerpoint", "unidistill_response"]
    assert "loss/unidistill_feature" not in res["train"] and res["train"]["loss/unidistill_response"] > 0


def test_student_alone_and_refusals(tmp_path, data_root):
    alone = _run(_config(tmp_path, data_root, teacher=None, preset="detection_only"))
    assert "teacher" not in alone and 0.0 <= alone["student"]["mAP"] <= 1.0
    with pytest.raises(ConfigError, match="unidistill_feature.*need a teacher|preset: detection_only"):
        _run(_config(tmp_path / "b", data_root, teacher=None))
    with pytest.raises(ConfigError, match="unknown preset 'camera_to_lidar'"):
        _run(_config(tmp_path / "c", data_root, preset="camera_to_lidar"))


def test_teacher_on_another_grid_refused(tmp_path, data_root):
    import torch

    from xmodal.data.bev import BEVGrid
    from xmodal.nn.bev import BEVDetector, BEVDetectorConfig, save_detector

    torch.manual_seed(0)
    other = BEVDetector(BEVDetectorConfig(sensor="lidar", grid=BEVGrid((0, 16), (-8, 8), 4.0), channels=8,
                                          backbone_channels=8, head_channels=8))
    save_detector(other, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="share one grid"):
        _run(_config(tmp_path, data_root, **{"teacher.model": None, "teacher.train": None,
                                             "teacher.path": str(tmp_path / "other.pt")}))


def test_teacher_cache_then_distill_from_it(tmp_path, data_root, capsys):
    from xmodal.cli import main

    cache = tmp_path / "cache"
    cfg_path = _config(tmp_path, data_root, **{"teacher.cache": str(cache)})
    assert main(["cache", str(cfg_path), "--dtype", "float32", "--no-progress"]) == 0
    assert "teacher cache ready" in capsys.readouterr().out
    cached = _run(cfg_path)
    online = _run(_config(tmp_path / "online", data_root))
    assert cached["train"]["loss"] == pytest.approx(online["train"]["loss"], rel=1e-4)


def test_examples_validate():
    root = Path(__file__).resolve().parent.parent / "examples"
    for name in ("bev_lidar_to_camera.yaml", "bev_camera_to_lidar.yaml"):
        job, cfg = load_job_config(root / name)
        assert job == "bev_distill" and cfg.teacher is not None

"""The prompt_distill job end to end on a tiny synthetic world: results, the teacher's text tower never running in
training or evaluation, zero-shot evaluation and export of the prompted student, unlabelled image folders, and
bad input refused before anything is written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from xmodal.config import JOBS, load_job_config
from xmodal.errors import CheckpointError, ConfigError, DataError

TINY_TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_STUDENT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write(tmp: Path, cfg: dict, name: str = "job.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"job": "prompt_distill", **cfg}, sort_keys=False))
    return path


def run_job(path: Path, overrides=()):
    name, cfg = load_job_config(path, list(overrides))
    return JOBS.get(name).run(cfg)


class TextTowerCounter:
    """Counts the teacher's text-tower calls, and those made while the class vectors are computed."""

    def __init__(self, mp: pytest.MonkeyPatch):
        import xmodal.tasks.prompt.classes as classes
        import xmodal.tasks.prompt.job as job

        self.total = self.storing = 0
        self._in_store = False
        original_obtain, original_compute = job.obtain_teacher_model, classes.compute_class_vectors

        def obtain(*args, **kwargs):
            bundle = original_obtain(*args, **kwargs)
            bundle.model.transformer.register_forward_pre_hook(self._count)  # the text transformer
            return bundle

        def compute(*args, **kwargs):
            self._in_store = True
            try:
                return original_compute(*args, **kwargs)
            finally:
                self._in_store = False

        mp.setattr(job, "obtain_teacher_model", obtain)
        mp.setattr(classes, "compute_class_vectors", compute)

    def _count(self, module, args):
        self.total += 1
        self.storing += self._in_store

    @property
    def outside_store(self) -> int:
        return self.total - self.storing


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promptjob")
    cfg = {
        "run_dir": str(tmp / "run"), "pretrain_dir": str(tmp / "pre"),
        "data": {"root": str(tmp / "data"),
                 "synthetic": {"train": 48, "val": 48, "test": 8, "image_size": 32, "zeroshot_per_class": 2}},
        "teacher": {"model_cfg": TINY_TEACHER, "train": {"steps": 3, "batch_size": 16, "warmup_steps": 1}},
        "student": {"model_cfg": TINY_STUDENT, "train": {"steps": 2, "batch_size": 16, "warmup_steps": 1},
                    "prompts": {"n": 2, "depth": 2}},
        "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2, "eval_every": 2},
        "eval": {"batch_size": 64},
    }
    path = write(tmp, cfg)
    with pytest.MonkeyPatch.context() as mp:
        counter = TextTowerCounter(mp)
        results = run_job(path)
    run = tmp / "run"
    record = json.loads((run / "prompted_student.json").read_text())
    return {"tmp": tmp, "run": run, "config": path, "results": results, "counter": counter, "record": record,
            "teacher": record["teacher"]["model"], "student": record["student"]["model"],
            "class_vectors": record["class_vectors"], "data": tmp / "data"}


def zeroshot_task(finished) -> dict:
    return json.loads((finished["data"] / "zeroshot.json").read_text())


def test_results_report_base_novel_and_hm_of_teacher_student_and_prompted_student(finished):
    run, results = finished["run"], finished["results"]
    task = zeroshot_task(finished)
    classes, images = len(task["classnames"]), len(task["images"])
    assert json.loads((run / "results.json").read_text()) == json.loads(json.dumps(results))
    for name in ("teacher", "student_zeroshot", "prompt_distilled"):
        m = results[name]
        assert set(m) >= {"base", "novel", "hm", "all"}
        assert all(0 <= m[k] <= 1 for k in ("base", "novel", "hm"))
        assert m["n_base"] + m["n_novel"] == images  # every test image is of a base or a novel class
    assert results["classes"] == classes and len(results["base_classes"]) == (classes + 1) // 2
    assert results["base_classes"] == sorted(results["base_classes"])
    sel = json.loads((run / "selection.json").read_text())
    assert results["selected"]["metric"] == "hm" and sel["metric"] == "hm"
    best = max(sel["history"], key=lambda h: h["hm"])["hm"]
    assert results["selected"]["value"] == best  # chosen on validation images, never the test split
    assert (run / "prompts.safetensors").stat().st_size < 64 * 1024
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/val_hm" in r for r in records) and any("loss/prompt_kd" in r for r in records)
    assert not list(run.rglob(".*.tmp"))


def test_teacher_text_tower_runs_only_to_store_the_class_vectors(finished):
    counter = finished["counter"]
    assert counter.storing > 0  # the first run stored W_T
    assert counter.outside_store == 0  # training, validation and the test report never ran the text tower


def test_a_second_run_reads_the_stored_class_vectors_and_never_runs_the_text_tower(finished, tmp_path):
    cfg = yaml.safe_load(finished["config"].read_text())
    cfg.update(run_dir=str(tmp_path / "run2"), class_vectors=finished["class_vectors"])
    cfg["train"]["steps"] = 2
    with pytest.MonkeyPatch.context() as mp:
        counter = TextTowerCounter(mp)
        results = run_job(write(tmp_path, cfg))
    assert counter.total == 0
    assert results["class_vectors"] == finished["class_vectors"]


def test_eval_zeroshot_on_a_prompted_run_matches_the_job_and_needs_no_teacher(finished, tmp_path, monkeypatch):
    import xmodal.tasks.prompt.cli as cli
    from xmodal.cli import main

    loaded = []
    original = cli._load_clip
    monkeypatch.setattr(cli, "_load_clip", lambda src, what, dev: loaded.append(what) or original(src, what, dev))
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--model", str(finished["run"]), "--data", str(finished["data"] / "zeroshot.json"),
                 "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert loaded == ["student"]  # class vectors were stored: the teacher is not even loaded
    task = zeroshot_task(finished)
    assert metrics["prompted"] and metrics["n"] == len(task["images"]) and metrics["classes"] == len(task["classnames"])
    expected = finished["results"]["prompt_distilled"]
    for key in ("base", "novel", "hm"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6)
    assert metrics["top1"] == pytest.approx(expected["all"], abs=1e-6)


def test_export_merges_prompts_into_a_program_plain_torch_runs(finished, tmp_path):
    from xmodal.cli import main
    from xmodal.tasks.prompt.cli import load_prompted_run

    out = tmp_path / "merged"
    assert main(["export", str(finished["run"]), "--format", "prompted", "--out", str(out)]) == 0
    program = torch.export.load(str(out / "image_encoder.pt2")).module()
    student, _, _ = load_prompted_run(finished["run"], torch.device("cpu"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program(x), student.encode_image(x), atol=1e-5)
    assert json.loads((out / "prompted_clip.json").read_text())["classnames"] == zeroshot_task(finished)["classnames"]


def image_folder(finished, dst: Path, n: int = 24) -> Path:
    dst.mkdir(parents=True)
    for p in sorted((finished["data"] / "images" / "train").glob("*.png"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def pretrained_cfg(finished, tmp: Path, **extra) -> dict:
    cfg = {
        "run_dir": str(tmp / "run"),
        "teacher": {"model": finished["teacher"]},
        "student": {"model": finished["student"], "prompts": {"n": 2, "depth": 1}, "projector": "linear"},
        "data": {"train": str(image_folder(finished, tmp / "images")), "val_fraction": 0.25,
                 "test": str(finished["data"] / "zeroshot.json")},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 1},
        "eval": {"batch_size": 64, "baselines": False},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def test_training_on_an_image_folder_without_labels(finished, tmp_path):
    results = run_job(write(tmp_path, pretrained_cfg(finished, tmp_path)))
    assert results["selected"]["metric"] == "agreement"  # unlabelled validation images: agreement with the teacher
    assert set(results) >= {"prompt_distilled"} and "teacher" not in results
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert [h["step"] for h in sel["history"]] == [1, 2]


def test_training_from_the_teacher_cache(finished, tmp_path):
    from xmodal.cli import main

    cfg = pretrained_cfg(finished, tmp_path, teacher={"cache": str(tmp_path / "cache")})
    path = write(tmp_path, cfg)
    assert main(["cache", str(path), "--no-progress"]) == 0
    results = run_job(path)
    assert results["step"] == 2


def corrupt_folder(finished, tmp: Path) -> str:
    folder = image_folder(finished, tmp / "broken", n=6)
    (folder / "000099.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return str(folder)


def other_width_prompts(finished, tmp: Path) -> str:
    from xmodal.students.prompted_clip import PromptedCLIP
    from xmodal.teachers.clip import load_open_clip

    clip = load_open_clip(finished["student"]).model
    return str(PromptedCLIP(clip, teacher_dim=40, n_prompts=2, depth=1, projector="linear")
               .save_prompts(tmp / "other.safetensors"))


BAD = {
    "empty class list": (lambda f, t: {"classes": {"names": [], "templates": ["a {}."]}, "data": {"test": None}},
                         DataError, "class list is empty"),
    "template without {}": (lambda f, t: {"classes": {"templates": ["a picture"]}}, DataError, "placeholder"),
    "class count differs from stored W_T": (
        lambda f, t: {"class_vectors": f["class_vectors"], "data": {"test": None},
                      "classes": {"names": ["a", "b", "c"], "templates": ["a {}."]}},
        CheckpointError, r"holds class vectors for \d+ classes.*has 3"),
    "W_T of another teacher": (lambda f, t: {"class_vectors": f["class_vectors"], "teacher": {"model": f["student"]}},
                               CheckpointError, "teacher differs"),
    "projector width mismatch": (lambda f, t: {"student": {"prompts_file": other_width_prompts(f, t)}},
                                 ConfigError, "projector maps 16 → 40"),
    "unreadable image": (lambda f, t: {"data": {"train": corrupt_folder(f, t)}}, DataError, "000099.png"),
    "labels asked of an unlabelled folder": (
        lambda f, t: {"losses": [{"name": "prompt_kd", "params": {"ce_weight": 1.0}}]}, ConfigError, "labels"),
    "a loss that needs text features": (lambda f, t: {"losses": [{"name": "affinity"}]}, ConfigError, "affinity"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_named_error_and_leaves_nothing_behind(finished, tmp_path, case):
    make, error, match = BAD[case]
    cfg = pretrained_cfg(finished, tmp_path, **make(finished, tmp_path))
    with pytest.raises(error, match=match):
        run_job(write(tmp_path, cfg))
    assert not (tmp_path / "run").exists()


def test_eval_on_another_class_set_stores_its_class_vectors_once(finished, tmp_path, monkeypatch):
    import xmodal.tasks.prompt.cli as cli
    from xmodal.cli import main

    task = zeroshot_task(finished)
    keep = task["classnames"][:3]
    other = {"classnames": keep, "templates": ["a drawing of a {}", "one {}"],
             "images": [{"filepath": str(finished["data"] / im["filepath"]), "label": im["label"]}
                        for im in task["images"] if im["label"] < 3]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    loaded = []
    original = cli._load_clip
    monkeypatch.setattr(cli, "_load_clip", lambda src, what, dev: loaded.append(what) or original(src, what, dev))
    store = tmp_path / "other_vectors.safetensors"
    args = ["eval", "zeroshot", "--model", str(finished["run"]), "--data", str(tmp_path / "other.json"),
            "--class-vectors", str(store), "--out", str(tmp_path / "a.json"), "--no-progress"]
    assert main(args) == 0
    assert loaded == ["student", "teacher"] and store.is_file()  # the teacher's text tower ran once, to store them
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["classes"] == 3 and {"base", "novel", "hm"} <= set(first)
    loaded.clear()
    assert main(args) == 0
    assert loaded == ["student"]
    assert json.loads((tmp_path / "a.json").read_text())["top1"] == first["top1"]

"""The clip_distill job end to end on a tiny synthetic world, progressive stages, and a miniature demo."""

import json
from pathlib import Path

import pytest
import torch

from xmodal.config import load_job_config
from xmodal.errors import ConfigError

TINY_TEACHER = """
teacher:
  model_cfg:
    embed_dim: 32
    vision_cfg: {image_size: 32, patch_size: 8, layers: 2, width: 64, head_width: 16}
    text_cfg: {context_length: 32, vocab_size: 49408, width: 64, heads: 4, layers: 2}
  train: {steps: 3, batch_size: 16, warmup_steps: 1, log_every: 1}
"""


def write_config(tmp_path: Path, body: str) -> Path:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"job: clip_distill\nrun_dir: {tmp_path / 'run'}\n"
        f"data:\n  root: {tmp_path / 'data'}\n  synthetic: {{train: 48, val: 16, test: 16, image_size: 32}}\n"
        + TINY_TEACHER + body
    )
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from xmodal.config import JOBS

    tmp = tmp_path_factory.mktemp("clipjob")
    cfg_path = write_config(tmp, """
student:
  shrink: {vision: {layers: 1, width: 0.5}, text: {layers: 1, width: 0.5}}
losses: [{name: affinity}, {name: fd, weight: 0.5}]
train: {steps: 4, batch_size: 16, warmup_steps: 1, log_every: 2, eval_every: 2}
""")
    name, cfg = load_job_config(cfg_path)
    results = JOBS.get(name).run(cfg)
    return tmp / "run", results


def test_run_writes_checkpoint_metrics_and_student_config(finished_run):
    run, results = finished_run
    assert (run / "student_open_clip.json").is_file() and (run / "results.json").is_file()
    assert len(list((run / "teacher").glob("*/open_clip/open_clip_config.json"))) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/affinity" in r for r in records) and any("loss/fd" in r for r in records)
    assert any("eval/text_to_image_R@1" in r for r in records)
    assert results["stage0"]["params"] < results["teacher"]["params"]


def test_export_loads_in_open_clip_with_same_embeddings(finished_run, tmp_path):
    import open_clip

    from xmodal.cli import main

    run, _ = finished_run
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "open_clip", "--out", str(out)]) == 0
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    state = torch.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1], weights_only=True)["model"]
    clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    ref = open_clip.create_model_and_transforms(f"local-dir:{out}")[0]
    ref.load_state_dict(clip_state)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval().encode_image(x), ref.eval().encode_image(x), atol=1e-6)


def test_teacher_is_reused_when_settings_are_unchanged(finished_run, caplog):
    from xmodal.config import JOBS

    run, _ = finished_run
    cfg_path = run.parent / "job.yaml"
    name, cfg = load_job_config(cfg_path, ["train.steps=1", f"run_dir={run.parent / 'run2'}"])
    (run.parent / "run2").mkdir(exist_ok=True)
    import shutil

    shutil.copytree(run / "teacher", run.parent / "run2" / "teacher")
    with caplog.at_level("INFO", logger="xmodal"):
        JOBS.get(name).run(cfg)
    assert "reusing the teacher trained earlier" in caplog.text


def test_progressive_stages_inherit_from_previous_stage(tmp_path):
    from xmodal.config import JOBS

    cfg_path = write_config(tmp_path, """
stages:
  - {shrink: {vision: {width: 0.75}, text: {width: 0.75}}, steps: 2}
  - {shrink: {vision: {layers: 1, width: 0.5}, text: {layers: 1, width: 0.5}}, steps: 2}
train: {steps: 2, batch_size: 16, warmup_steps: 1, log_every: 1}
eval: {zeroshot: false}
""")
    name, cfg = load_job_config(cfg_path)
    results = JOBS.get(name).run(cfg)
    assert results["stage0"]["params"] > results["stage1"]["params"]
    assert (tmp_path / "run" / "stages" / "0" / "checkpoints").is_dir()
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the last stage is the run itself (exportable)


def test_config_errors(tmp_path):
    cfg_path = write_config(tmp_path, "student: {shrink: {vision: {width: 0.5}}, model: ViT-B-32}\n")
    with pytest.raises(ConfigError, match="exactly one of 'model', 'model_cfg' or 'shrink'"):
        load_job_config(cfg_path)
    cfg_path = write_config(tmp_path, "student: {shrink: {vision: {width: 0.5}}}\nlosses: [{name: afinity}]\n")
    from xmodal.losses import build_losses

    with pytest.raises(ConfigError, match="did you mean 'affinity'"):  # when the config loads or the losses build
        name, cfg = load_job_config(cfg_path)
        build_losses(cfg.losses)


def test_demo_runs_and_prints_a_table(tmp_path, capsys):
    from xmodal.cli import main

    teacher = ("teacher_cfg={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, layers: 2, width: 64, "
               "head_width: 16}, text_cfg: {context_length: 32, vocab_size: 49408, width: 64, heads: 4, layers: 2}}")
    args = ["demo", "--out", str(tmp_path / "demo"), "--set", teacher]
    for s in ("data_train=48", "data_val=16", "data_test=24", "teacher_train.steps=2", "teacher_train.batch_size=16",
              "student_train.steps=2", "student_train.batch_size=16", "student_train.eval_every=1"):
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| teacher |" in out and "| distilled |" in out and "| scratch |" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["rows"]["distilled"]["params"] == results["rows"]["scratch"]["params"]
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 1000


def test_cached_teacher_path(tmp_path):
    """`xmodal cache` stores the teacher's outputs; distillation then reads them instead of running the teacher."""
    from xmodal.cli import main
    from xmodal.config import JOBS

    cache = tmp_path / "teacher_cache"
    cfg_path = write_config(tmp_path, """
student:
  shrink: {vision: {layers: 1, width: 0.5}, text: {layers: 1, width: 0.5}}
train: {steps: 2, batch_size: 16, warmup_steps: 1, log_every: 1}
eval: {zeroshot: false}
""")
    text = cfg_path.read_text().replace("data:\n", "data:\n  caption_sampling: first\n")
    cfg_path.write_text(text)
    assert main(["cache", str(cfg_path), "--out", str(cache)]) == 0  # as the README does it
    assert (cache / "manifest.json").is_file()
    cfg_path.write_text(text.replace("teacher:\n", f"teacher:\n  cache: {cache}\n"))
    name, cfg = load_job_config(cfg_path)
    results = JOBS.get(name).run(cfg)
    assert results["stage0"]["step"] == 2
    bad = cfg_path.read_text().replace("caption_sampling: first", "caption_sampling: random")
    cfg_path.write_text(bad)
    with pytest.raises(ConfigError, match="set data.caption_sampling to 'all'"):
        load_job_config(cfg_path)


def test_eval_retrieval_on_a_run_folder_matches_the_jobs_own_evaluation(finished_run, tmp_path):
    from xmodal.cli import main

    run, _ = finished_run
    out = tmp_path / "results.json"
    data = run.parent / "data" / "val.csv"
    assert main(["eval", "retrieval", "--checkpoint", str(run), "--data", str(data), "--no-cache",
                 "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval/text_to_image_R@1" in r][-1]
    assert metrics["text_to_image_R@1"] == pytest.approx(final["eval/text_to_image_R@1"], abs=1e-6)


def test_teacher_and_students_are_built_on_the_engines_per_rank_device(tmp_path, monkeypatch):
    """Under torchrun each process owns one GPU: the job must join the group first and build on that device."""
    from xmodal.tasks.clip import job

    rank_device = torch.device("cpu", 1)  # stands in for cuda:LOCAL_RANK, which only init_distributed knows
    calls = []

    class Stop(Exception):
        pass

    def init_distributed(device="auto", *args, **kwargs):
        calls.append(("init_distributed", device))
        return rank_device

    real_obtain = job.obtain_teacher

    def obtain_teacher(cfg, paths, data_cfg, run_dir, device):
        calls.append(("teacher", device))
        return real_obtain(cfg, paths, data_cfg, run_dir, torch.device("cpu"))

    def build_student(teacher, model_cfg, inherit, device, *args, **kwargs):
        calls.append(("student", device))
        raise Stop

    monkeypatch.setattr(job, "init_distributed", init_distributed, raising=False)
    monkeypatch.setattr(job, "obtain_teacher", obtain_teacher)
    monkeypatch.setattr(job, "build_student", build_student)
    cfg_path = write_config(tmp_path, "student: {shrink: {vision: {width: 0.5}, text: {width: 0.5}}}\n"
                                      "train: {steps: 1, batch_size: 16, device: cpu}\n")
    name, cfg = load_job_config(cfg_path)
    with pytest.raises(Stop):
        job.run(cfg)
    assert calls == [("init_distributed", "cpu"), ("teacher", rank_device), ("student", rank_device)]


    def teacher_only(cfg, paths, data_cfg, run_dir, device):
        calls.append(("teacher", device))
        raise Stop

    calls.clear()
    monkeypatch.setattr(job, "obtain_teacher", teacher_only)
    with pytest.raises(Stop):
        job.cache_source(cfg)  # `xmodal cache` loads the teacher the same way
    assert calls == [("init_distributed", "cpu"), ("teacher", rank_device)]

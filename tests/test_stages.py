"""Staged runs: the stage record, and progressive CLIP runs that resume stage by stage after an interruption."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from xmodal.config import JOBS, load_job_config
from xmodal.engine import Distiller
from xmodal.engine.stages import DONE, PENDING, RUNNING, STAGES_FILE, Stage, StageRun, train_identity
from xmodal.errors import CheckpointError

# ---------------------------------------------------------------- the stage record alone


def plan(*widths, steps=(2, 2)):
    return [Stage(f"stage{k}", "" if k == len(widths) - 1 else f"stages/{k}", {"model_cfg": {"width": w}}, s)
            for k, (w, s) in enumerate(zip(widths, steps))]


def finish_all(run_dir, stages_plan):
    stages = StageRun(run_dir, stages_plan)
    for i in range(len(stages)):
        stages.start(i)
        stages.finish(i, step=stages[i].steps, result={"loss": 1.0 + i})
    return stages


def test_record_is_written_and_read_back(tmp_path):
    stages = StageRun(tmp_path, plan(48, 32))
    assert [r.status for r in stages] == [PENDING, PENDING]
    stages.start(0)
    stages.finish(0, step=2, result={"loss": 0.5, "arch": "x"})
    data = json.loads((tmp_path / STAGES_FILE).read_text())
    assert data["stages"][0]["status"] == DONE
    assert data["stages"][0]["checkpoint"] == "stages/0/checkpoints/step_0000002.pt"
    assert data["stages"][1]["status"] == PENDING
    again = StageRun(tmp_path, plan(48, 32), resume="latest")
    assert again[0].result == {"loss": 0.5, "arch": "x"} and again.first_open() == 1
    assert again.resume(0) == again.resume(1) == "auto" and again.folder(1) == tmp_path
    assert StageRun(tmp_path, plan(48, 32), resume="ckpt.pt").resume(1) == "ckpt.pt"  # a path: the last stage
    assert StageRun(tmp_path / "new", plan(48, 32)).resume(0) is None
    assert StageRun(tmp_path / "new2", plan(48, 32), resume="auto").resume(0) == "auto"
    with pytest.raises(CheckpointError, match="nothing to resume .*no stage has started"):
        StageRun(tmp_path / "new3", plan(48, 32), resume="latest")


def test_started_stages_need_resume_and_an_unchanged_plan(tmp_path):
    stages = StageRun(tmp_path, plan(48, 32))
    stages.start(0)
    with pytest.raises(CheckpointError, match="already holds a staged run .*stage0 running.*--resume"):
        StageRun(tmp_path, plan(48, 32))
    with pytest.raises(CheckpointError, match=r"stage0 \(stages/0\) differs.*\n  model_cfg.width: 48 → 40"):
        StageRun(tmp_path, plan(40, 32), resume="latest")
    changed_later = StageRun(tmp_path, plan(48, 24), resume="latest")  # a stage not started yet may change
    assert changed_later[1].identity == {"model_cfg": {"width": 24}} and changed_later[0].status == RUNNING
    with pytest.raises(CheckpointError, match="number of stages changed"):
        StageRun(tmp_path, plan(48), resume="latest")


def test_steps_of_finished_stages(tmp_path):
    finish_all(tmp_path, plan(48, 32))
    with pytest.raises(CheckpointError, match=r"stage0 .*\n  steps: 2 → 3 \(the stages after it learned from"):
        StageRun(tmp_path, plan(48, 32, steps=(3, 2)), resume="latest")
    longer = StageRun(tmp_path, plan(48, 32, steps=(2, 5)), resume="latest")  # the last stage trains on
    assert longer[0].status == DONE and longer[1].status == RUNNING and longer[1].steps == 5
    with pytest.raises(CheckpointError, match="stage1 .* was trained, but the plan now has 1 stage"):
        StageRun(tmp_path, plan(48, steps=(2,)), resume="latest")


def test_unreadable_record_and_missing_checkpoint(tmp_path):
    stages = finish_all(tmp_path, plan(48, 32))
    with pytest.raises(CheckpointError, match="stage0 is recorded as finished with checkpoint .* missing"):
        stages.checkpoint(0)
    (tmp_path / STAGES_FILE).write_text('{"stages": [{"name": ')
    with pytest.raises(CheckpointError, match="stages.json: not a readable stage record"):
        StageRun(tmp_path, plan(48, 32), resume="latest")


def test_train_identity_leaves_out_what_a_resume_may_change():
    from xmodal.config import TrainConfig

    ident = train_identity(TrainConfig(steps=7, lr=0.1, log_every=3, device="cpu"))
    assert ident["lr"] == 0.1 and not {"steps", "log_every", "device"} & set(ident)


# ---------------------------------------------------------------- progressive CLIP runs

STAGED = """
job: clip_distill
run_dir: {run}
data:
  root: {data}
  synthetic: {{train: 48, val: 16, test: 16, image_size: 32}}
teacher:
  model_cfg:
    embed_dim: 32
    vision_cfg: {{image_size: 32, patch_size: 8, layers: 2, width: 64, head_width: 16}}
    text_cfg: {{context_length: 32, vocab_size: 49408, width: 64, heads: 4, layers: 2}}
  train: {{steps: 2, batch_size: 16, warmup_steps: 1, log_every: 1, device: cpu}}
stages:
  - {{shrink: {{vision: {{width: 0.75}}, text: {{width: {text_width}}}}}, steps: 3}}
  - {{shrink: {{vision: {{layers: 1, width: 0.5}}, text: {{layers: 1, width: 0.5}}}}, steps: 4}}
train: {{steps: 2, batch_size: 16, warmup_steps: 1, log_every: 1, device: cpu, precision: fp32}}
eval: {{zeroshot: false}}
"""


def staged_config(folder: Path, run: Path, data: Path, resume: bool = False, text_width: float = 0.75):
    path = folder / f"{run.name}.yaml"
    path.write_text(STAGED.format(run=run, data=data, text_width=text_width))
    return load_job_config(path, ["resume=latest"] if resume else [])[1]


def final_weights(run: Path) -> dict:
    pointer = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / pointer, weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-stage run, and the folder its data lives in."""
    tmp = tmp_path_factory.mktemp("staged")
    results = JOBS.get("clip_distill").run(staged_config(tmp, tmp / "reference", tmp / "data"))
    return tmp, tmp / "reference", results


def test_run_interrupted_in_stage_two_resumes_to_the_same_weights(reference, monkeypatch):
    from xmodal.students.export import export_run

    tmp, ref, ref_results = reference
    run = tmp / "interrupted"
    step = Distiller._optimizer_step
    seen = {}

    def interrupt_in_stage_two(self, *args, **kwargs):
        if self.run.path == run:
            seen.setdefault("config_before_training", (run / "student_open_clip.json").is_file())
            if self.step == 2:
                raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "_optimizer_step", interrupt_in_stage_two)
    with pytest.raises(KeyboardInterrupt):
        JOBS.get("clip_distill").run(staged_config(tmp, run, tmp / "data"))
    monkeypatch.setattr(Distiller, "_optimizer_step", step)

    assert seen["config_before_training"]  # the interrupted stage is exportable
    student_cfg = json.loads((run / "student_open_clip.json").read_text())["model_cfg"]
    assert student_cfg["vision_cfg"]["layers"] == 1 and student_cfg["vision_cfg"]["width"] == 32
    assert (export_run(run, out_dir=tmp / "export") / "open_clip_config.json").is_file()
    record = json.loads((run / STAGES_FILE).read_text())["stages"]
    assert [r["status"] for r in record] == [DONE, RUNNING]
    stage0_metrics = (run / "stages" / "0" / "metrics.jsonl").read_text()

    results = JOBS.get("clip_distill").run(staged_config(tmp, run, tmp / "data", resume=True))
    assert (run / "stages" / "0" / "metrics.jsonl").read_text() == stage0_metrics  # stage 0 was not trained again
    assert [r["status"] for r in json.loads((run / STAGES_FILE).read_text())["stages"]] == [DONE, DONE]
    for k in ("stage0", "stage1"):
        assert results[k]["step"] == ref_results[k]["step"] and results[k]["loss"] == ref_results[k]["loss"]
    mine, theirs = final_weights(run), final_weights(ref)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name


def test_run_interrupted_between_stages_inherits_from_the_reloaded_stage(reference, monkeypatch):
    """Stage 1 has no checkpoint yet: it inherits from stage 0's final checkpoint, as the live run did."""
    tmp, ref, ref_results = reference
    run = tmp / "between"
    start = StageRun.start

    def interrupt_before_stage_two(self, i):
        if i == 1:
            raise KeyboardInterrupt
        start(self, i)

    monkeypatch.setattr(StageRun, "start", interrupt_before_stage_two)
    with pytest.raises(KeyboardInterrupt):
        JOBS.get("clip_distill").run(staged_config(tmp, run, tmp / "data"))
    monkeypatch.setattr(StageRun, "start", start)
    assert not (run / "checkpoints").exists()

    results = JOBS.get("clip_distill").run(staged_config(tmp, run, tmp / "data", resume=True))
    assert results["stage1"]["loss"] == ref_results["stage1"]["loss"]
    mine, theirs = final_weights(run), final_weights(ref)
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name


def test_resuming_a_finished_run_reports_its_results_without_training(reference, monkeypatch):
    tmp, ref, ref_results = reference

    def no_training(self, *args, **kwargs):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(Distiller, "fit", no_training)
    metrics = (ref / "metrics.jsonl").read_text()
    results = JOBS.get("clip_distill").run(staged_config(tmp, ref, tmp / "data", resume=True))
    assert results == json.loads(json.dumps(ref_results))
    assert (ref / "metrics.jsonl").read_text() == metrics


def test_a_changed_plan_is_refused_on_resume(reference):
    tmp, ref, _ = reference
    run = tmp / "changed"
    shutil.copytree(ref, run)
    refused = r"(?s)stage0 \(stages/0\) differs .*\n  model_cfg.text_cfg.width: 48 → 32"
    with pytest.raises(CheckpointError, match=refused):
        JOBS.get("clip_distill").run(staged_config(tmp, run, tmp / "data", resume=True, text_width=0.5))
    with pytest.raises(CheckpointError, match="already holds a staged run"):
        JOBS.get("clip_distill").run(staged_config(tmp, run, tmp / "data"))

"""Automatic inheritance: gates start open (teacher exactly), closed gates remove units, fusing is exact, sparsity."""

import math

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.losses import LOSSES
from xmodal.students.auto_inheritance import HardConcreteGate, MaskedCLIP, learn_masks
from xmodal.students.clip import create_student, shrink_model_cfg

TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 4},
}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_student(TEACHER).eval()


def inputs(n=4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 999, (n, 16), generator=g)


def test_hard_concrete_gate():
    gate = HardConcreteGate((1000,), init=0.0)
    z = gate()
    assert ((z >= 0) & (z <= 1)).all() and (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    gate.eval()
    assert torch.allclose(gate(), torch.full((1000,), 0.5))  # sigmoid(0)·1.2 − 0.1
    assert HardConcreteGate((3,), init=3.0).eval()().eq(1).all()
    assert HardConcreteGate((3,), init=-10.0).eval()().eq(0).all()
    expected = 1 / (1 + math.exp((2 / 3) * math.log(0.1 / 1.1)))  # sigmoid(log α − β·log(−γ/ζ))
    assert gate.prob_open()[0].item() == pytest.approx(expected)


def test_open_gates_reproduce_the_teacher_and_gradients_reach_the_gates(teacher):
    masked = MaskedCLIP(teacher).eval()
    img, txt = inputs()
    with torch.no_grad():
        assert torch.equal(masked.encode_image(img), teacher.encode_image(img))
        assert torch.equal(masked.encode_text(txt), teacher.encode_text(txt))
    assert not any(p.requires_grad for p in masked.model.parameters())  # weights frozen by default
    masked.train()
    (masked.encode_image(img).sum() + masked.encode_text(txt).sum()).backward()
    for tower in ("vision", "text"):
        for kind in ("layers", "heads", "mlp"):
            assert masked.gates[tower][kind].log_alpha.grad is not None


def test_closed_gates_remove_units_and_fusing_is_exact(teacher):
    masked = MaskedCLIP(teacher)
    with torch.no_grad():
        for tower in ("vision", "text"):
            masked.gates[tower]["layers"].log_alpha[[1, 3]] = -10.0
            masked.gates[tower]["mlp"].log_alpha[:, :128] = -10.0
    masked.eval()
    img, txt = inputs()
    with torch.no_grad():
        mi, mt = masked.encode_image(img), masked.encode_text(txt)
    assert not torch.allclose(mi, teacher.encode_image(img), atol=1e-3)
    spec = {"vision": {"layers": 2, "mlp_ratio": 2.0}, "text": {"layers": 2, "mlp_ratio": 2.0}}
    cfg = shrink_model_cfg(TEACHER, spec)
    student, report = masked.fuse(cfg)
    assert report["vision"]["layers"] == [0, 2] and report["text"]["layers"] == [0, 2]
    assert report["mode"] == "auto"
    with torch.no_grad():
        assert torch.allclose(student.encode_image(img), mi, atol=1e-5)
        assert torch.allclose(student.encode_text(txt), mt, atol=1e-5)
    assert not hasattr(student.visual.transformer.resblocks[0].mlp.c_proj, "parametrizations")
    # the masked model itself still works after fusing
    with torch.no_grad():
        assert torch.equal(masked.encode_image(img), mi)


def test_lagrangian_drives_density_to_target(teacher):
    masked = MaskedCLIP(teacher)
    cfg = shrink_model_cfg(TEACHER, {"vision": {"layers": 2, "width": 0.5}, "text": {"layers": 2, "width": 0.5}})
    target = masked.target_density(cfg)
    assert target == pytest.approx(0.25)  # half the layers, half the heads and MLP channels in each
    assert masked.expected_density().item() > 0.95
    opt = torch.optim.AdamW(masked.mask_parameters(), lr=0.1, weight_decay=0.0)
    opt_l = torch.optim.AdamW([masked.lambdas], lr=0.1, weight_decay=0.0, maximize=True)
    for _ in range(400):
        loss = masked.sparsity_loss(target)
        opt.zero_grad()
        opt_l.zero_grad()
        loss.backward()
        opt.step()
        opt_l.step()
    assert masked.expected_density().item() == pytest.approx(target, abs=0.02)


def test_learn_masks_then_fuse(teacher):
    masked = MaskedCLIP(teacher)
    cfg = shrink_model_cfg(TEACHER, {"vision": {"layers": 2, "width": 0.5}, "text": {"layers": 2, "width": 0.5}})
    affinity = LOSSES.build("affinity")
    before = masked.gates["vision"]["heads"].log_alpha.detach().clone()

    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            yield {"image": torch.randn(4, 3, 32, 32, generator=g),
                   "text": torch.randint(1, 999, (4, 16), generator=g)}

    history = learn_masks(masked, teacher, batches(), lambda s, t, b: affinity(s, t, b).loss, cfg,
                          steps=3, lr=0.1, warmup_steps=2)
    assert [h["step"] for h in history] == [0, 1, 2]
    assert history[0]["target"] > history[1]["target"] == history[2]["target"] == pytest.approx(0.25)
    assert not torch.equal(before, masked.gates["vision"]["heads"].log_alpha)
    student, report = masked.fuse(cfg)
    img, txt = inputs(2)
    with torch.no_grad():
        assert student.encode_image(img).shape == (2, 32) and student.encode_text(txt).shape == (2, 32)
    assert len(report["vision"]["layers"]) == 2 and 0 < report["density"] <= 1


def test_non_vit_tower_is_rejected():
    resnet = {**TEACHER, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16, "image_size": 64}}
    with pytest.raises(ConfigError, match="gates ViT image towers"):
        MaskedCLIP(create_student(resnet))


JOB = """
job: clip_distill
run_dir: {run}
data:
  root: {data}
  synthetic: {{train: 32, val: 16, test: 16, image_size: 32}}
teacher:
  model_cfg: {teacher}
student:
  shrink: {{vision: {{layers: 2, width: 0.5}}, text: {{layers: 2, width: 0.5}}}}
  inherit: {{mode: auto, auto: {{steps: 3, warmup_steps: 2, batch_size: 8}}}}
train: {{steps: 1, batch_size: 8, warmup_steps: 0, device: cpu, precision: fp32}}
eval: {{zeroshot: false}}
"""


def test_clip_job_learns_masks_and_starts_from_the_fused_student(tmp_path, monkeypatch):
    import json

    from xmodal.config import JOBS, load_job_config
    from xmodal.tasks.clip import job

    fused, trained_from = [], []
    real_fuse = MaskedCLIP.fuse

    def spy(self, student_cfg, preprocess_cfg=None):
        student, report = real_fuse(self, student_cfg, preprocess_cfg)
        fused.append((student_cfg, {k: v.clone() for k, v in student.state_dict().items()}))
        return student, report

    monkeypatch.setattr(MaskedCLIP, "fuse", spy)
    real_train = job.train_clip

    def train_clip(clip_model, *args, **kwargs):
        trained_from.append({k: v.clone() for k, v in clip_model.model.state_dict().items()})
        return real_train(clip_model, *args, **kwargs)

    monkeypatch.setattr(job, "train_clip", train_clip)
    job_teacher = {**TEACHER, "text_cfg": {**TEACHER["text_cfg"], "vocab_size": 49408}}  # open_clip's tokenizer
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(run=tmp_path / "run", data=tmp_path / "data", teacher=json.dumps(job_teacher)))
    name, cfg = load_job_config(path)
    results = JOBS.get(name).run(cfg)
    assert results["stage0"]["inherit"] == "auto" and 0 < results["stage0"]["mask_density"] <= 1
    student_cfg = json.loads((tmp_path / "run" / "student_open_clip.json").read_text())["model_cfg"]
    assert len(fused) == 1 and fused[0][0] == student_cfg and student_cfg["vision_cfg"]["layers"] == 2
    assert len(trained_from) == 1 and trained_from[0].keys() == fused[0][1].keys()  # training starts from it
    assert all(torch.equal(trained_from[0][k], v) for k, v in fused[0][1].items())


def test_auto_inheritance_config_errors(teacher):
    from xmodal.tasks.clip.config import AutoInheritConfig, InheritConfig
    from xmodal.tasks.clip.job import build_student, wrap_open_clip

    with pytest.raises(ConfigError, match="auto.steps must be at least 1"):
        AutoInheritConfig(steps=0)
    cfg = shrink_model_cfg(TEACHER, {"vision": {"layers": 2}, "text": {"layers": 2}})
    with pytest.raises(ConfigError, match="learns masks on training data"):
        build_student(wrap_open_clip(teacher, TEACHER), cfg, InheritConfig(mode="auto"), torch.device("cpu"))

"""Native vs projected features: what the same-space losses train is what evaluation uses and export ships;
only teacher-comparing losses see the student's projection into the teacher's width."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.config import TrainConfig
from xmodal.engine import Distiller
from xmodal.errors import ConfigError
from xmodal.fingerprint import model_fingerprint
from xmodal.losses import LOSSES, build_losses
from xmodal.tasks.clip.models import ClipStudent, ClipTeacher


def tiny_clip_cfg(embed_dim: int, width: int) -> dict:
    """A two-layer open_clip config that builds in milliseconds (as in conftest.py)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": width // 16, "layers": 2},
    }


class ImageText(Dataset):
    """Seeded random 32×32 images and token ids (tiny open_clip inputs) with string ids."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randn(n, 3, 32, 32, generator=g)
        self.text = torch.randint(1, 1000, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"s{i}", "image": self.image[i], "text": self.text[i]}


def make_clip(embed_dim: int, width: int, seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**tiny_clip_cfg(embed_dim, width))


def train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=3, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1, seed=0,
                                 device="cpu", precision="fp32"), **kw})


def record_inputs(losses) -> dict:
    """label → the (student, teacher) outputs each loss of the set received, filled on every call."""
    seen: dict = {}
    for label, loss in zip(losses.labels, losses.losses):
        loss.register_forward_hook(lambda m, args, out, label=label: seen.__setitem__(label, args[:2]))
    return seen


def probe(distiller: Distiller, teacher, batch: dict) -> dict[str, torch.Tensor]:
    """One loss evaluation (no update) with the trained student; returns the loss parts."""
    distiller.objective.eval()
    with torch.no_grad():
        _, parts = distiller.objective(batch, None if teacher is None else teacher(batch))
    return parts


def test_cross_width_student_trains_and_exports_its_native_embeddings(tmp_path):
    import open_clip

    from xmodal.students.export import export_run, write_student_config

    teacher = ClipTeacher(make_clip(64, 64, seed=1))
    model = make_clip(32, 32, seed=2)
    student = ClipStudent(model, teacher.dim)  # 32 → 64: a linear projection by default
    losses = build_losses([{"name": "fd", "weight": 10.0}, {"name": "clip"}, {"name": "affinity"}])
    seen = record_inputs(losses)
    d = Distiller(student, losses, ImageText(), train_cfg(), tmp_path / "run", teacher=teacher, progress=False)
    d.fit()

    batch = {"image": ImageText(seed=5).image[:6], "text": ImageText(seed=5).text[:6]}
    probe(d, teacher, batch)
    model.eval()
    with torch.no_grad():
        image, text = model.encode_image(batch["image"]), model.encode_text(batch["text"])
    for label in ("clip", "affinity"):  # same-space losses train what evaluation uses
        s = seen[label][0]
        assert s["image"].pooled.shape == (6, 32) and s["image"].projected is None
        torch.testing.assert_close(s["image"].pooled, image)
        torch.testing.assert_close(s["text"].pooled, text)
    fd_student, fd_teacher = seen["fd"]  # the teacher-comparing loss sees the projection into the teacher's width
    assert fd_student["image"].pooled.shape == fd_teacher["image"].pooled.shape == (6, 64)
    proj = student.space.projections
    torch.testing.assert_close(fd_student["image"].pooled, proj["student__image"](image))
    torch.testing.assert_close(fd_student["text"].pooled, proj["student__text"](text))

    write_student_config(tmp_path / "run", tiny_clip_cfg(32, 32))
    out = export_run(tmp_path / "run", out_dir=tmp_path / "exported")
    exported = open_clip.create_model(f"local-dir:{out}", device="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_image(batch["image"]), image)
        torch.testing.assert_close(exported.encode_text(batch["text"]), text)


def test_same_width_projected_student_is_evaluated_on_what_the_contrastive_loss_trained(tmp_path):
    model = make_clip(32, 32, seed=3)
    student = ClipStudent(model, 32, projection="linear")
    w0 = student.space.projections["student__image"].weight.detach().clone()
    losses = build_losses([{"name": "clip"}])
    seen = record_inputs(losses)
    d = Distiller(student, losses, ImageText(), train_cfg(), tmp_path / "run", progress=False)
    d.fit()
    batch = {"image": ImageText(seed=6).image[:5], "text": ImageText(seed=6).text[:5]}
    probe(d, None, batch)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(seen["clip"][0]["image"].pooled, model.encode_image(batch["image"]))
        torch.testing.assert_close(seen["clip"][0]["text"].pooled, model.encode_text(batch["text"]))
    # nothing trained through the projection evaluation skips
    assert torch.equal(student.space.projections["student__image"].weight, w0)


def test_exported_logit_scale_is_the_trained_temperature(tmp_path):
    import open_clip

    from xmodal.students.export import export_open_clip

    model = make_clip(32, 32, seed=4)
    start = float(model.logit_scale.detach().exp())
    d = Distiller(ClipStudent(model), build_losses([{"name": "clip"}]), ImageText(), train_cfg(lr=0.05),
                  tmp_path / "run", progress=False)
    d.fit()
    batch = {"image": ImageText(seed=7).image[:4], "text": ImageText(seed=7).text[:4]}
    trained = float(probe(d, None, batch)["clip/scale"])
    assert trained != pytest.approx(start, rel=1e-3)  # the temperature did train
    out = export_open_clip(model, tiny_clip_cfg(32, 32), tmp_path / "exported")
    exported = open_clip.create_model(f"local-dir:{out}", device="cpu")
    assert float(exported.logit_scale.exp()) == pytest.approx(trained, rel=1e-6)


def test_clip_loss_refuses_its_own_scale_beside_the_students():
    model = make_clip(32, 32, seed=4)
    out = ClipStudent(model)({"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 99, (2, 16))})
    with pytest.raises(ConfigError, match="student has its own logit_scale.*drop 'scale'"):
        LOSSES.build("clip", scale=20.0)(out)
    fixed = LOSSES.build("clip", learn_scale=False)(out)  # the student's, held fixed
    assert float(fixed.parts["scale"]) == pytest.approx(float(model.logit_scale.exp()))
    fixed.loss.backward()
    assert model.logit_scale.grad is None and model.visual.conv1.weight.grad is not None


def test_hinton_on_clip_features_is_a_clear_config_error(tmp_path):
    from xmodal.tasks.clip.models import check_losses

    with pytest.raises(ConfigError, match=r"'hinton' needs student image\.logits, teacher image\.logits, but the "
                                          r"student produces image: pooled; text: pooled.*not class logits"):
        check_losses([{"name": "affinity"}, {"name": "hinton"}])
    with pytest.raises(ConfigError, match=r"'affinity' needs teacher image\.pooled.*the teacher nothing"):
        check_losses([{"name": "affinity"}], teacher=False)
    check_losses([{"name": "clip"}, {"name": "fd"}, {"name": "icl"}, {"name": "dcd"}, {"name": "affinity"}])

    # the loss itself, if it is reached: an error naming what it needed and what was there
    teacher, student = ClipTeacher(make_clip(32, 64, seed=1)), ClipStudent(make_clip(32, 32, seed=2))
    batch = {"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 99, (2, 16))}
    with pytest.raises(ConfigError, match=r"'hinton' needs student logits for 'image'.*hold pooled \[2, 32\]"):
        build_losses([{"name": "hinton"}])(student(batch), teacher(batch), batch)


def test_clip_job_refuses_hinton_before_training_its_teacher(tmp_path):
    from xmodal.config import JOBS, load_job_config

    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(f"""
job: clip_distill
run_dir: {tmp_path / 'run'}
data: {{root: {tmp_path / 'data'}, synthetic: {{train: 16, val: 8, test: 8, image_size: 32}}}}
teacher:
  model_cfg: {tiny_clip_cfg(32, 64)}
  train: {{steps: 1, batch_size: 8}}
student: {{shrink: {{vision: {{layers: 1}}, text: {{layers: 1}}}}}}
losses: [{{name: hinton}}]
""")
    name, cfg = load_job_config(cfg_path)
    with pytest.raises(ConfigError, match="'hinton' needs student image.logits"):
        JOBS.get(name).run(cfg)
    assert not (tmp_path / "run" / "teacher").exists() and not (tmp_path / "data").exists()


def test_clip_teacher_is_a_frozen_module_kept_out_of_the_optimizer(tmp_path):
    clip = make_clip(32, 64, seed=1)
    teacher = ClipTeacher(clip, extra={"preprocess": 1})
    assert isinstance(teacher, nn.Module)
    assert {id(p) for p in teacher.parameters()} == {id(p) for p in clip.parameters()}
    assert len(teacher.state_dict()) == len(clip.state_dict())  # the adapters hold no second copy
    assert teacher.fingerprint == model_fingerprint(clip, {"preprocess": 1})
    teacher.train()
    assert not clip.training and not any(p.requires_grad for p in teacher.parameters())
    student = ClipStudent(make_clip(32, 32, seed=2), teacher.dim)
    d = Distiller(student, build_losses([{"name": "affinity"}, {"name": "fd"}]), ImageText(), train_cfg(steps=1),
                  tmp_path / "run", teacher=teacher, progress=False)
    in_optimizer = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    d.fit()
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    teacher.to(torch.float64)  # the engine places it with .to(device): the open_clip model moves with it
    assert clip.visual.conv1.weight.dtype == torch.float64
    out = teacher({"image": torch.randn(2, 3, 32, 32, dtype=torch.float64), "text": torch.randint(1, 99, (2, 16))})
    assert out["image"].pooled.dtype == torch.float64 and out["text"].pooled.shape == (2, 32)


def test_each_loss_declares_the_view_it_compares():
    from xmodal.features import NATIVE, PROJECTED

    projected = {"fd", "icl", "feature_mse", "feature_cosine", "libs", "libs_frame", "libs_sequence", "libs_context"}
    native = {"clip", "affinity", "dcd", "hinton", "reverse_kl", "js", "ctc", "ctc_kd", "attention_ce"}
    for name in projected:
        assert LOSSES.get(name).view == PROJECTED, name
    for name in native:
        assert LOSSES.get(name).view == NATIVE, name

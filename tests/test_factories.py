"""One create_teacher and one create_student driven by registries, and one CLIP bundle type."""

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.models import STUDENTS, TEACHERS, create_student, create_teacher
from xmodal.openclip import ClipBundle

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_create_student_is_the_one_factory_for_every_kind():
    import open_clip

    from xmodal.students import clip as students_clip
    from xmodal.students.lipreader import LipReader, tiny_lipreader_config

    assert students_clip.create_student is create_student
    model = create_student(TINY, {"mean": [0.5] * 3, "std": [0.25] * 3})  # the kind follows from the config
    assert isinstance(model, open_clip.CLIP)
    assert open_clip.get_model_preprocess_cfg(model)["mean"] == [0.5] * 3
    assert isinstance(create_student(tiny_lipreader_config()), LipReader)
    assert {"open_clip", "lipreader"} <= set(STUDENTS.names())
    with pytest.raises(ConfigError, match="student: no kind match this config"):
        create_student({"layers": 3})
    with pytest.raises(ConfigError, match="unknown student kind 'open_clp' \\(did you mean 'open_clip'\\?\\)"):
        create_student(TINY, kind="open_clp")


def test_create_teacher_by_kind_and_family():
    from xmodal.tasks.clip.job import ClipModel, load_clip, wrap_open_clip
    from xmodal.teachers.clip import LoadedCLIP

    assert {"open_clip", "speech", "wav2vec2"} <= set(TEACHERS.names())
    torch.manual_seed(0)
    teacher = create_teacher({"model_cfg": TINY})  # recognised as an open_clip teacher
    assert isinstance(teacher, ClipBundle) and ClipModel is ClipBundle and LoadedCLIP is ClipBundle
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.model_cfg == TINY and teacher.image_size == 32 and teacher.tokenizer.context_length == 16
    assert teacher.eval_transform is teacher.preprocess and teacher.train_transform is teacher.preprocess_train
    trainable = load_clip(type("Spec", (), {"model": None, "pretrained": None, "model_cfg": TINY})(), "cpu")
    assert any(p.requires_grad for p in trainable.model.parameters())
    same = wrap_open_clip(teacher.model, TINY)
    assert same.fingerprint == teacher.fingerprint
    before = teacher.fingerprint
    with torch.no_grad():
        teacher.model.logit_scale.add_(1.0)  # a changed weight is a changed identity
    assert teacher.fingerprint != before
    with pytest.raises(ConfigError, match="unknown speech teacher kind 'wav2vec' \\(did you mean 'wav2vec2'\\?\\); "
                                          "known: speech, wav2vec2"):
        create_teacher({"kind": "wav2vec", "path": "x.pt"}, family="speech")
    with pytest.raises(ConfigError, match="teacher kind 'open_clip' is a clip model, but this job needs a speech"):
        create_teacher({"kind": "open_clip", "model_cfg": TINY}, family="speech")


def test_run_checkpoint_loads_as_the_same_bundle_type(tmp_path):
    from xmodal.students.export import STUDENT_CONFIG_NAME, load_clip_checkpoint, write_student_config

    torch.manual_seed(0)
    model = create_student(TINY)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {f"clip.{k}": v for k, v in model.state_dict().items()}, "step": 1},
               run / "checkpoints" / "step_0000001.pt")
    write_student_config(run, TINY, None)
    assert (run / STUDENT_CONFIG_NAME).is_file()
    bundle = load_clip_checkpoint(run / "checkpoints" / "step_0000001.pt")
    assert isinstance(bundle, ClipBundle) and bundle.model_cfg == TINY
    assert bundle.fingerprint == ClipBundle(model, bundle.preprocess, bundle.preprocess_train, bundle.tokenizer,
                                            model_cfg=TINY, preprocess_cfg=bundle.preprocess_cfg).fingerprint

"""Student configs: shrink specs (absolute, fractional, percentage), teacher configs, student construction."""

import json
import types

import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.students.clip import (
    ShrinkSpec,
    create_student,
    describe_model_cfg,
    model_cfg_of,
    progressive_model_cfgs,
    resolve_size,
    shrink_model_cfg,
    student_transforms,
)

TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}


def test_resolve_size_forms():
    assert resolve_size(None, 12, "k") == 12
    assert resolve_size(6, 12, "k") == 6
    assert resolve_size(0.5, 12, "k") == 6
    assert resolve_size("75%", 12, "k") == 9
    assert resolve_size(1.0, 12, "k") == 1  # a whole number is absolute, even written as 1.0
    assert resolve_size(0.3, 768, "k", multiple=64) == 256  # rounded to whole heads
    assert resolve_size(0.01, 768, "k", multiple=64) == 64  # never below one head
    with pytest.raises(ConfigError, match="exceeds the teacher's 12"):
        resolve_size(16, 12, "k")
    with pytest.raises(ConfigError, match="multiple of 64"):
        resolve_size(100, 768, "k", multiple=64)
    with pytest.raises(ConfigError, match="percentage"):
        resolve_size("150%", 12, "k")
    with pytest.raises(ConfigError, match="not a size"):
        resolve_size("half", 12, "k")
    with pytest.raises(ConfigError, match="neither a fraction"):
        resolve_size(2.5, 12, "k")


def test_shrink_keeps_head_width_and_embed_dim():
    cfg = shrink_model_cfg(TEACHER, {"vision": {"layers": 2, "width": 0.5}, "text": {"width": "50%", "layers": 0.5}})
    assert cfg["vision_cfg"] == {**TEACHER["vision_cfg"], "layers": 2, "width": 32, "head_width": 16}
    assert cfg["text_cfg"] == {**TEACHER["text_cfg"], "layers": 2, "width": 32, "heads": 2}
    assert cfg["embed_dim"] == 32  # kept: affinity/FD need no projector
    assert TEACHER["vision_cfg"]["width"] == 64  # the teacher config is not modified


def test_shrink_heads_mlp_embed_image_size_context():
    spec = {
        "vision": {"heads": 2, "width": 32, "mlp_ratio": 2.0, "image_size": 48},
        "text": {"heads": 2, "context_length": 8},
        "embed_dim": 0.5,
    }
    cfg = shrink_model_cfg(TEACHER, spec)
    assert cfg["vision_cfg"]["width"] == 32 and cfg["vision_cfg"]["head_width"] == 16
    assert cfg["vision_cfg"]["mlp_ratio"] == 2.0 and cfg["vision_cfg"]["image_size"] == 48
    assert cfg["text_cfg"]["heads"] == 2 and cfg["text_cfg"]["width"] == 64  # heads given, width kept
    assert cfg["text_cfg"]["context_length"] == 8
    assert cfg["embed_dim"] == 16
    model = create_student(cfg)
    assert model.visual.transformer.resblocks[0].mlp.c_fc.out_features == 64
    assert model.visual.preprocess_cfg["size"] == 48


def test_shrink_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'vision.depth'.*valid keys here: layers, width"):
        ShrinkSpec.from_dict({"vision": {"depth": 3}})
    with pytest.raises(ConfigError, match=r"shrink.text.width: 32 must be a multiple of 3"):
        shrink_model_cfg(TEACHER, {"text": {"heads": 3, "width": 32}})
    with pytest.raises(ConfigError, match=r"shrink.text.heads: 5 exceeds the teacher's 4"):
        shrink_model_cfg(TEACHER, {"text": {"heads": 5}})
    with pytest.raises(ConfigError, match="mlp_ratio"):
        shrink_model_cfg(TEACHER, {"vision": {"mlp_ratio": 8.0}})
    with pytest.raises(ConfigError, match="image_size.*patch size 8"):
        shrink_model_cfg(TEACHER, {"vision": {"image_size": 36}})
    resnet = {**TEACHER, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 32, "image_size": 64}}
    with pytest.raises(ConfigError, match="ModifiedResNet"):
        shrink_model_cfg(resnet, {"vision": {"width": 0.5}})
    assert shrink_model_cfg(resnet, {"text": {"layers": 2}})["vision_cfg"] == resnet["vision_cfg"]


def test_progressive_stages_are_relative_to_teacher_and_may_only_shrink():
    stages = progressive_model_cfgs(TEACHER, [{"vision": {"width": 1.0 * 64}}, {"vision": {"width": 0.75}},
                                              {"vision": {"width": "50%"}}])
    assert [s["vision_cfg"]["width"] for s in stages] == [64, 48, 32]
    with pytest.raises(ConfigError, match=r"stages\[1\].*vision.width = 64 is larger"):
        progressive_model_cfgs(TEACHER, [{"vision": {"width": 0.5}}, {"vision": {"width": 64}}])


def test_create_student_clip_and_custom_text():
    torch.manual_seed(0)
    model = create_student(TEACHER)
    assert type(model).__name__ == "CLIP"
    img, txt = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    assert model.encode_image(img).shape == (2, 32) and model.encode_text(txt).shape == (2, 32)
    custom = create_student({**TEACHER, "custom_text": True})
    assert type(custom).__name__ == "CustomTextCLIP"
    assert custom.encode_text(txt).shape == (2, 32)
    train_tf, eval_tf = student_transforms(model)
    from PIL import Image

    assert eval_tf(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert train_tf(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="cannot build an open_clip model"):
        create_student({**TEACHER, "text_cfg": {**TEACHER["text_cfg"], "nonsense": 1}})


def test_model_cfg_of_name_folder_and_loaded(tmp_path):
    cfg = model_cfg_of("ViT-B-32")
    assert cfg["vision_cfg"]["patch_size"] == 32 and cfg["embed_dim"] == 512
    cfg["embed_dim"] = 1  # a copy: open_clip's registry is untouched
    assert model_cfg_of("ViT-B/32")["embed_dim"] == 512
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TEACHER, "preprocess_cfg": {}}))
    assert model_cfg_of(str(tmp_path)) == TEACHER
    assert model_cfg_of(f"local-dir:{tmp_path}") == TEACHER
    loaded = types.SimpleNamespace(name="ViT-B-32", pretrained=str(tmp_path))  # weights from a folder
    assert model_cfg_of(loaded) == TEACHER
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-32'"):
        model_cfg_of("ViT-B-23")


def test_describe():
    assert describe_model_cfg(TEACHER) == "vision 4L×64 (4 heads) | text 4L×64 (4 heads) | embed 32"

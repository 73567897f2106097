"""Manual weight inheritance: exact copies at full size, working smaller models, importance selection, errors."""

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.students.clip import create_student, shrink_model_cfg
from xmodal.students.inheritance import (
    first_layers,
    inherit_from_model_cfg,
    inherit_weights,
    uniform_layers,
)

TEACHER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 4},
}
HALF = {"vision": {"layers": 2, "width": 0.5}, "text": {"layers": 2, "width": 0.5}}


def make(cfg, seed):
    torch.manual_seed(seed)
    return create_student(cfg).eval()


def inputs(n=8, seed=123, size=32, ctx=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(1, 999, (n, ctx), generator=g)


def embed(model, img, txt):
    with torch.no_grad():
        return model.encode_image(img), model.encode_text(txt)


def test_layer_selection():
    assert uniform_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert uniform_layers(12, 4) == [0, 3, 6, 9]
    assert uniform_layers(4, 3) == [0, 1, 2]
    assert first_layers(12, 3) == [0, 1, 2]


CUSTOM_BLOCKS = {  # qk-norm, head scales, inner/MLP norms, layer scale, biased text projection
    **TEACHER,
    "vision_cfg": {**TEACHER["vision_cfg"], "qk_norm": True, "scale_heads": True, "scale_attn_inner": True,
                   "scale_attn": True, "scale_fc": True, "ls_init_value": 0.1},
    "text_cfg": {**TEACHER["text_cfg"], "ls_init_value": 0.1, "proj_bias": True},
}
VARIANTS = {"clip": TEACHER, "custom_text": {**TEACHER, "custom_text": True}, "custom_blocks": CUSTOM_BLOCKS}


@pytest.mark.parametrize("channels", ["first", "importance"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_size_inheritance_reproduces_teacher_exactly(channels, variant):
    cfg = VARIANTS[variant]
    teacher, student = make(cfg, 0), make(cfg, 1)
    img, txt = inputs()
    assert not torch.equal(embed(student, img, txt)[0], embed(teacher, img, txt)[0])
    report = inherit_weights(teacher, student, layers="uniform", channels=channels)
    si, st = embed(student, img, txt)
    ti, tt = embed(teacher, img, txt)
    assert torch.equal(si, ti) and torch.equal(st, tt)
    assert torch.equal(student.logit_scale, teacher.logit_scale)
    assert report["vision"]["layers"] == [0, 1, 2, 3] and report["text"]["residual"] == list(range(64))


def test_half_size_custom_blocks_work():
    teacher = make(CUSTOM_BLOCKS, 0)
    student = make(shrink_model_cfg(CUSTOM_BLOCKS, {**HALF, "embed_dim": 16}), 1)
    report = inherit_weights(teacher, student, channels="importance")
    heads = torch.tensor(report["vision"]["heads"][1])
    assert torch.equal(student.visual.transformer.resblocks[1].attn.head_scale,
                       teacher.visual.transformer.resblocks[2].attn.head_scale[heads])
    img, txt = inputs(n=2)
    si, st = embed(student, img, txt)
    assert si.shape == (2, 16) and st.shape == (2, 16) and torch.isfinite(si).all() and torch.isfinite(st).all()


def test_half_size_is_a_working_model_of_the_right_shapes():
    teacher = make(TEACHER, 0)
    cfg = shrink_model_cfg(TEACHER, HALF)
    student, report = inherit_from_model_cfg(teacher, cfg, layers="uniform", channels="first")
    assert report["vision"]["layers"] == [0, 2] and report["text"]["layers"] == [0, 2]
    assert report["vision"]["width"] == [64, 32] and report["vision"]["heads"] == {0: [0, 1], 1: [0, 1]}
    assert report["text"]["mlp"] == [[256, 128], [256, 128]]
    v, t = student.visual, student
    assert v.conv1.weight.shape == (32, 3, 8, 8) and v.positional_embedding.shape == (17, 32)
    assert v.proj.shape == (32, 32) and len(v.transformer.resblocks) == 2
    assert t.token_embedding.weight.shape == (1000, 32) and t.text_projection.shape == (32, 32)
    assert t.transformer.resblocks[1].attn.in_proj_weight.shape == (96, 32)
    assert t.transformer.resblocks[1].mlp.c_fc.weight.shape == (128, 32)
    # the kept weights are the teacher's own slices
    t_fc = teacher.visual.transformer.resblocks[2].mlp.c_fc.weight
    assert torch.equal(v.transformer.resblocks[1].mlp.c_fc.weight, t_fc[:128, :32])
    q, k, _ = teacher.transformer.resblocks[2].attn.in_proj_weight.chunk(3)
    sq, sk, _ = t.transformer.resblocks[1].attn.in_proj_weight.chunk(3)
    assert torch.equal(sq, q[:32, :32]) and torch.equal(sk, k[:32, :32])
    img, txt = inputs()
    si, st = embed(student, img, txt)
    assert si.shape == (8, 32) and st.shape == (8, 32) and torch.isfinite(si).all() and torch.isfinite(st).all()
    # trainable: one contrastive step moves every tensor
    student.train()
    logits = student.logit_scale.exp() * F.normalize(student.encode_image(img), dim=-1) @ F.normalize(
        student.encode_text(txt), dim=-1).T
    F.cross_entropy(logits, torch.arange(8)).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.mark.parametrize("channels", ["first", "importance"])
def test_half_size_is_closer_to_teacher_than_random_init(channels):
    teacher = make(TEACHER, 0)
    cfg = shrink_model_cfg(TEACHER, HALF)
    inherited = make(cfg, 1)
    inherit_weights(teacher, inherited, channels=channels)
    img, txt = inputs(n=32)
    ti, tt = embed(teacher, img, txt)

    def cos(model):
        si, st = embed(model, img, txt)
        return F.cosine_similarity(si, ti).mean().item(), F.cosine_similarity(st, tt).mean().item()

    ci, ct = cos(inherited)
    randoms = [cos(make(cfg, seed)) for seed in (2, 3)]
    assert ci > 0.4 and ci > max(r[0] for r in randoms) + 0.2
    assert (ci + ct) / 2 > max((r[0] + r[1]) / 2 for r in randoms) + 0.1


def _kill_first_half(teacher):
    """Zero heads 0-1 and MLP channels 0-127 of every layer: they contribute nothing to the teacher's output."""
    with torch.no_grad():
        for blocks in (teacher.visual.transformer.resblocks, teacher.transformer.resblocks):
            for b in blocks:
                w = b.attn.in_proj_weight.view(3, 4, 16, 64)
                w[:, :2] = 0
                b.attn.in_proj_bias.view(3, 4, 16)[:, :2] = 0
                b.attn.out_proj.weight.view(64, 4, 16)[:, :2] = 0
                b.mlp.c_fc.weight[:128] = 0
                b.mlp.c_fc.bias[:128] = 0
                b.mlp.c_proj.weight[:, :128] = 0


def test_importance_keeps_live_mlp_channels_and_heads():
    teacher = make(TEACHER, 0)
    _kill_first_half(teacher)
    cfg = shrink_model_cfg(TEACHER, {"vision": {"mlp_ratio": 2.0}, "text": {"mlp_ratio": 2.0}})
    img, txt = inputs()
    ti, tt = embed(teacher, img, txt)
    important, first = make(cfg, 1), make(cfg, 1)
    inherit_weights(teacher, important, channels="importance")
    inherit_weights(teacher, first, channels="first")
    si, st = embed(important, img, txt)
    # dead channels carry nothing, so keeping only the live half reproduces the teacher
    assert torch.allclose(si, ti, atol=1e-5) and torch.allclose(st, tt, atol=1e-5)
    fi, ft = embed(first, img, txt)
    assert not torch.allclose(fi, ti, atol=1e-3)
    # heads: a half-width student keeps the two live heads of every layer
    half = make(shrink_model_cfg(TEACHER, {"vision": {"width": 0.5}, "text": {"width": 0.5}}), 1)
    report = inherit_weights(teacher, half, channels="importance")
    assert all(h == [2, 3] for h in report["vision"]["heads"].values())
    assert all(h == [2, 3] for h in report["text"]["heads"].values())


def test_importance_keeps_the_same_residual_channels_everywhere():
    teacher = make(TEACHER, 0)
    with torch.no_grad():  # make residual channels 40..63 of the vision tower much larger than the rest
        for name, p in teacher.visual.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                p[40:] *= 10
    student = make(shrink_model_cfg(TEACHER, {"vision": {"width": 0.5}}), 1)
    report = inherit_weights(teacher, student, channels="importance")
    res = report["vision"]["residual"]
    assert set(range(40, 64)) <= set(res) and len(res) == 32 and res == sorted(res)
    idx = torch.tensor(res)
    assert torch.equal(student.visual.class_embedding, teacher.visual.class_embedding[idx])
    assert torch.equal(student.visual.ln_post.weight, teacher.visual.ln_post.weight[idx])
    assert torch.equal(student.visual.transformer.resblocks[0].mlp.c_proj.bias,
                       teacher.visual.transformer.resblocks[0].mlp.c_proj.bias[idx])
    assert report["text"]["residual"] == list(range(64))


def test_embed_dim_subset_is_shared_by_both_towers():
    teacher = make(TEACHER, 0)
    student = make(shrink_model_cfg(TEACHER, {"embed_dim": 16}), 1)
    inherit_weights(teacher, student, channels="importance")
    cols = [j for j in range(32) if any(torch.equal(student.visual.proj[:, i], teacher.visual.proj[:, j])
                                        for i in range(16))]
    text_cols = [j for j in range(32) if any(torch.equal(student.text_projection[:, i], teacher.text_projection[:, j])
                                             for i in range(16))]
    assert cols == text_cols and len(cols) == 16


def test_explicit_layers_image_size_and_context_length():
    teacher = make(TEACHER, 0)
    spec = {"vision": {"layers": 2, "image_size": 48}, "text": {"layers": 2, "context_length": 8}}
    cfg = shrink_model_cfg(TEACHER, spec)
    student = make(cfg, 1)
    report = inherit_weights(teacher, student, layers={"vision": [1, 3], "text": [0, 3]})
    assert report["vision"]["layers"] == [1, 3] and report["text"]["layers"] == [0, 3]
    assert report["vision"]["positional_embedding"] == "resized"
    assert torch.equal(student.visual.positional_embedding[0], teacher.visual.positional_embedding[0])
    assert torch.equal(student.positional_embedding, teacher.positional_embedding[:8])
    img, txt = inputs(n=2, size=48, ctx=8)
    si, st = embed(student, img, txt)
    assert si.shape == (2, 32) and st.shape == (2, 32)
    with pytest.raises(ConfigError, match="must be distinct"):
        inherit_weights(teacher, student, layers={"vision": [1, 1], "text": [0, 3]})


def test_errors():
    teacher = make(TEACHER, 0)
    bigger = make({**TEACHER, "vision_cfg": {**TEACHER["vision_cfg"], "width": 128}}, 1)
    with pytest.raises(ConfigError, match="larger than the teacher"):
        inherit_weights(teacher, bigger)
    wide_heads = make(shrink_model_cfg(TEACHER, {"vision": {"heads": 2}}), 1)
    with pytest.raises(ConfigError, match="no wider heads"):
        inherit_weights(teacher, wide_heads)
    other_vocab = make({**TEACHER, "text_cfg": {**TEACHER["text_cfg"], "vocab_size": 500}}, 1)
    with pytest.raises(ConfigError, match="vocabulary"):
        inherit_weights(teacher, other_vocab)
    with pytest.raises(ConfigError, match="unknown channel selection 'importanc'.*did you mean 'importance'"):
        inherit_weights(teacher, make(TEACHER, 1), channels="importanc")
    with pytest.raises(ConfigError, match="unknown layer selection"):
        inherit_weights(teacher, make(TEACHER, 1), layers="evenly")


def test_non_vit_tower_is_copied_when_unchanged():
    resnet = {**TEACHER, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 16, "image_size": 64}}
    teacher = make(resnet, 0)
    student = make(shrink_model_cfg(resnet, {"text": {"layers": 2, "width": 0.5}}), 1)
    report = inherit_weights(teacher, student, channels="importance")
    assert report["vision"] == {"mode": "copied"} and report["text"]["layers"] == [0, 2]
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(student.encode_image(img), teacher.encode_image(img))
    smaller_embed = make(shrink_model_cfg(resnet, {"embed_dim": 16}), 1)
    with pytest.raises(ConfigError, match="only ViT and text-transformer towers can shrink"):
        inherit_weights(teacher, smaller_embed)


def test_progressive_stages_inherit_from_the_previous_student():
    from xmodal.students.clip import progressive_model_cfgs

    teacher = make(TEACHER, 0)
    stages = progressive_model_cfgs(TEACHER, [{"vision": {"width": 0.75}, "text": {"width": 0.75}},
                                              {"vision": {"width": 0.5}, "text": {"width": 0.5}}])
    prev = teacher
    for cfg in stages:
        student = make(cfg, 1)
        inherit_weights(prev, student, channels="first")
        prev = student
    direct = make(stages[-1], 2)
    inherit_weights(teacher, direct, channels="first")
    img, txt = inputs(n=2)
    a, b = embed(prev, img, txt), embed(direct, img, txt)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # first-k of first-k is first-k

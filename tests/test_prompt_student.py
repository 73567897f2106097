"""The prompted CLIP student: deep visual prompts over a frozen open_clip ViT, its projector, prompt files, export."""

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip_cfg

from xmodal.errors import CheckpointError, ConfigError
from xmodal.students.prompted_clip import PromptedCLIP, PromptedVisionTransformer, export_merged


def make_clip(seed=0, pool_type=None, embed_dim=32, width=64):
    torch.manual_seed(seed)
    cfg = tiny_clip_cfg(embed_dim=embed_dim, width=width)
    if pool_type:
        cfg["vision_cfg"]["pool_type"] = pool_type
    return open_clip.model.CLIP(**cfg).eval()


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_zero_prompts_reproduce_the_plain_encoder_exactly(pool_type):
    clip = make_clip(pool_type=pool_type)
    x = torch.randn(3, 3, 32, 32)
    enc = PromptedVisionTransformer(clip.visual, n_prompts=0, depth=0)
    with torch.no_grad():
        assert torch.equal(enc(x), clip.visual(x))


def test_prompts_change_the_encoder_output():
    clip = make_clip()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = clip.visual(x)
        prompted = PromptedVisionTransformer(clip.visual, n_prompts=2, depth=2)(x)
    assert prompted.shape == plain.shape
    assert not torch.allclose(prompted, plain, atol=1e-4)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_prompt_tokens_sit_after_the_patches_are_replaced_per_block_and_never_reach_pooling(pool_type):
    clip = make_clip(pool_type=pool_type)
    n, depth = 3, 2
    enc = PromptedVisionTransformer(clip.visual, n_prompts=n, depth=depth, init_std=1.0)
    v = clip.visual
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
             for i, blk in enumerate(v.transformer.resblocks)]
    pooled_inputs = []
    original_pool = v._pool
    v._pool = lambda t: (pooled_inputs.append(t.shape), original_pool(t))[1]
    try:
        with torch.no_grad():
            enc(x)
            plain = v._embeds(x)
    finally:
        for h in hooks:
            h.remove()
        del v._pool
    patches = plain.shape[1]  # class token + patches
    assert seen[0].shape[1] == patches + n
    assert torch.equal(seen[0][:, :patches], plain)  # class token stays at 0, patches unchanged
    assert torch.allclose(seen[0][:, patches:], v.ln_pre(enc.prompts[0]).expand(2, -1, -1).detach())
    assert torch.equal(seen[1][:, patches:], enc.prompts[1].expand(2, -1, -1).detach())  # deep: replaced
    assert pooled_inputs == [torch.Size([2, patches, v.transformer.width])]  # prompts dropped before pooling


def test_a_resnet_tower_or_a_bad_depth_is_refused():
    torch.manual_seed(0)
    rn = open_clip.model.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
                              text_cfg={"context_length": 16, "width": 32, "heads": 2, "layers": 1})
    with pytest.raises(ConfigError, match="ViT"):
        PromptedVisionTransformer(rn.visual, 2, 1)
    with pytest.raises(ConfigError, match="depth"):
        PromptedVisionTransformer(make_clip().visual, 2, 5)


def test_only_prompts_and_projector_train_and_nothing_else_gets_a_gradient():
    clip = make_clip()
    student = PromptedCLIP(clip, teacher_dim=48, n_prompts=2, depth=2)
    student.set_class_vectors(F.normalize(torch.randn(5, 48), dim=-1))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.prompts", "projector.0.weight", "projector.0.bias", "projector.2.weight",
                         "projector.2.bias"}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    student.train()
    out = student({"image": torch.randn(4, 3, 32, 32)})["image"]
    assert out.logits.shape == (4, 5) and torch.allclose(out.pooled.norm(dim=-1), torch.ones(4))
    out.logits.logsumexp(dim=1).sum().backward()
    for name, p in student.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    opt.step()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoder.prompts", "projector.0.weight", "projector.0.bias", "projector.2.weight",
                       "projector.2.bias"}
    assert not student.encoder.visual.training  # the frozen encoder stays in eval mode


def test_linear_projector_and_class_vectors_of_the_wrong_width():
    student = PromptedCLIP(make_clip(), teacher_dim=48, n_prompts=1, depth=1, projector="linear")
    assert isinstance(student.projector, torch.nn.Linear) and student.projector.in_features == 32
    with pytest.raises(ConfigError, match="width 48"):
        student.set_class_vectors(torch.randn(5, 40))


def test_prompts_are_saved_and_loaded_on_their_own(tmp_path):
    clip = make_clip()
    a = PromptedCLIP(clip, teacher_dim=48, n_prompts=2, depth=2)
    path = a.save_prompts(tmp_path / "prompts.safetensors")
    assert path.stat().st_size < 64 * 1024  # prompts + projector, not the encoder
    b = PromptedCLIP(clip, teacher_dim=48, n_prompts=2, depth=2)
    assert not torch.equal(a.encoder.prompts, b.encoder.prompts)
    b.load_prompts(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
    assert not list(tmp_path.glob(".*.tmp"))


def test_prompt_files_for_another_projector_width_geometry_or_encoder_are_refused(tmp_path):
    path = PromptedCLIP(make_clip(), teacher_dim=48, n_prompts=2, depth=2).save_prompts(tmp_path / "p.safetensors")
    with pytest.raises(ConfigError, match="projector maps 32 → 48"):  # a student of another width
        PromptedCLIP(make_clip(embed_dim=16), teacher_dim=48, n_prompts=2, depth=2).load_prompts(path)
    with pytest.raises(ConfigError, match="projector maps 32 → 48"):  # a teacher of another width
        PromptedCLIP(make_clip(), teacher_dim=40, n_prompts=2, depth=2).load_prompts(path)
    with pytest.raises(CheckpointError, match="n_prompts"):
        PromptedCLIP(make_clip(), teacher_dim=48, n_prompts=3, depth=2).load_prompts(path)
    with pytest.raises(CheckpointError, match="another image encoder"):
        PromptedCLIP(make_clip(seed=1), teacher_dim=48, n_prompts=2, depth=2).load_prompts(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        PromptedCLIP(make_clip(), teacher_dim=48, n_prompts=2, depth=2).load_prompts(tmp_path / "junk.safetensors")


def test_merged_export_runs_without_xmodal_and_matches(tmp_path):
    student = PromptedCLIP(make_clip(), teacher_dim=48, n_prompts=2, depth=2)
    student.set_class_vectors(F.normalize(torch.randn(5, 48), dim=-1))
    out = export_merged(student, tmp_path / "merged", image_size=32, classnames=list("abcde"))
    program = torch.export.load(str(out / "image_encoder.pt2")).module()
    cv = torch.load(out / "class_vectors.pt", weights_only=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program(x), student.encode_image(x), atol=1e-6)
        logits = cv["logit_scale"] * program(x) @ cv["class_vectors"].t()
        assert torch.allclose(logits, student({"image": x})["image"].logits, atol=1e-4)
    with pytest.raises(ConfigError, match="already exists"):
        export_merged(student, out, image_size=32)

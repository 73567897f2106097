"""Manual weight inheritance (TinyCLIP): initialise a smaller open_clip CLIP from a teacher's weights.

Layers are kept at a uniform stride or the first k; attention heads and MLP channels are the first k or the
most important by weight magnitude; every width-d residual stream uses one channel subset per tower, and the
joint embedding one subset shared by both towers, so the pieces fit together. A student of the teacher's own
size inherits an exact copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.errors import ConfigError
from xmodal.registry import Registry

LAYER_SELECTION: Registry[Callable[[int, int], list[int]]] = Registry("layer selection")
CHANNEL_SELECTION: Registry[Callable[[Callable[[], Tensor], int, int], Tensor]] = Registry("channel selection")


@LAYER_SELECTION.register("uniform")
def uniform_layers(teacher_depth: int, student_depth: int) -> list[int]:
    """Indices 0, step, 2·step, … with step = T // S (TinyCLIP's manual inheritance)."""
    step = teacher_depth // student_depth
    return [i * step for i in range(student_depth)]


@LAYER_SELECTION.register("first")
def first_layers(teacher_depth: int, student_depth: int) -> list[int]:
    """The first S layers."""
    return list(range(student_depth))


@CHANNEL_SELECTION.register("first")
def first_channels(scores: Callable[[], Tensor], total: int, keep: int) -> Tensor:
    """The first `keep` of `total` channels (heads, MLP units, residual dims)."""
    return torch.arange(keep)


@CHANNEL_SELECTION.register("importance")
def important_channels(scores: Callable[[], Tensor], total: int, keep: int) -> Tensor:
    """The `keep` channels of largest weight magnitude, in their original order."""
    s = scores()
    if s.shape != (total,):
        raise ValueError(f"importance scores have shape {list(s.shape)}, expected [{total}]")
    return torch.topk(s.float(), keep).indices.sort().values.cpu()


# ---------------------------------------------------------------------------------------------- slicing rules
# Each parameter maps to the index set used along each of its axes:
#   res   residual channels of the tower          qkv   3 stacked copies of the attention inner channels
#   inner attention inner channels (heads × dim)   head  attention heads
#   hdim  dims within a head                      mlp   MLP hidden channels
#   embed joint embedding channels (both towers)   ctx   text positions

Rule = tuple[str, ...]

BLOCK_RULES: dict[str, Rule] = {
    "ln_1.weight": ("res",), "ln_1.bias": ("res",),
    "attn.in_proj_weight": ("qkv", "res"), "attn.in_proj_bias": ("qkv",),
    "attn.out_proj.weight": ("res", "inner"), "attn.out_proj.bias": ("res",),
    "attn.ln_q.weight": ("hdim",), "attn.ln_q.bias": ("hdim",),
    "attn.ln_k.weight": ("hdim",), "attn.ln_k.bias": ("hdim",),
    "attn.logit_scale": ("head",), "attn.head_scale": ("head",),
    "attn.ln_inner.weight": ("inner",), "attn.ln_inner.bias": ("inner",),
    "ln_attn.weight": ("res",), "ln_attn.bias": ("res",),
    "ls_1.gamma": ("res",), "ls_2.gamma": ("res",),
    "ln_2.weight": ("res",), "ln_2.bias": ("res",),
    "mlp.c_fc.weight": ("mlp", "res"), "mlp.c_fc.bias": ("mlp",),
    "mlp.ln.weight": ("mlp",), "mlp.ln.bias": ("mlp",),
    "mlp.c_proj.weight": ("res", "mlp"), "mlp.c_proj.bias": ("res",),
}  # fmt: skip

VISION_RULES: dict[str, Rule] = {
    "conv1.weight": ("res",),
    "class_embedding": ("res",),
    "positional_embedding": ("", "res"),
    "ln_pre.weight": ("res",), "ln_pre.bias": ("res",),
    "ln_post.weight": ("res",), "ln_post.bias": ("res",),
    "proj": ("res", "embed"),
}  # fmt: skip

TEXT_RULES: dict[str, Rule] = {
    "token_embedding.weight": ("", "res"),
    "positional_embedding": ("ctx", "res"),
    "cls_emb": ("res",),
    "ln_final.weight": ("res",), "ln_final.bias": ("res",),
    "text_projection": ("res", "embed"),
    "text_projection.weight": ("embed", "res"), "text_projection.bias": ("embed",),
}  # fmt: skip

SHARED_KEYS = ("logit_scale", "logit_bias")
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------- tower views


@dataclass
class _Tower:
    """One tower of a CLIP: its state-dict prefix, transformer and sizes."""

    name: str  # "vision" | "text"
    prefix: str  # state-dict prefix ("visual.", "text." or "")
    module: nn.Module | None  # the module holding the tower's own parameters (None: text of a CLIP)
    transformer: nn.Module | None  # None when the tower is not a transformer we can slice
    rules: dict[str, Rule]

    @property
    def depth(self) -> int:
        return len(self.transformer.resblocks)

    @property
    def width(self) -> int:
        return int(self.transformer.width)

    def heads(self, i: int) -> int:
        return int(self.transformer.resblocks[i].attn.num_heads)

    def mlp(self, i: int) -> int:
        return int(self.transformer.resblocks[i].mlp.c_fc.out_features)


def _towers(model: nn.Module) -> dict[str, _Tower]:
    from open_clip.transformer import TextTransformer, VisionTransformer

    visual = model.visual
    vit = isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None
    towers = {"vision": _Tower("vision", "visual.", visual, visual.transformer if vit else None, VISION_RULES)}
    text = getattr(model, "text", None)
    if text is not None:
        tt = text.transformer if isinstance(text, TextTransformer) else None
        towers["text"] = _Tower("text", "text.", text, tt, TEXT_RULES)
    else:
        towers["text"] = _Tower("text", "", None, model.transformer, TEXT_RULES)
    return towers


def _split_key(key: str, towers: Mapping[str, _Tower]) -> tuple[str, str]:
    """(tower name or "shared", key relative to the tower)."""
    if key in SHARED_KEYS:
        return "shared", key
    for tower in towers.values():
        if tower.prefix and key.startswith(tower.prefix):
            return tower.name, key[len(tower.prefix):]
    return "text", key  # a CLIP keeps its text tower at the top level


# ---------------------------------------------------------------------------------------------- index plans


@dataclass
class _LayerPlan:
    teacher_layer: int
    heads: Tensor  # teacher head indices kept
    hdim: Tensor  # dims kept within each head
    inner: Tensor  # attention inner channels kept (heads × hdim, head-major)
    mlp: Tensor


@dataclass
class _TowerPlan:
    res: Tensor
    layers: list[_LayerPlan] = field(default_factory=list)
    ctx: Tensor | None = None


def _abs_mass(t: Tensor, axis: int) -> Tensor:
    """Per-channel L1 mass along `axis`, normalised to mean 1 so differently scaled weights weigh alike."""
    t = t.detach().float().abs()
    dims = [d for d in range(t.dim()) if d != axis]
    m = t.sum(dim=dims) if dims else t
    return m / m.mean().clamp_min(1e-12)


def _channel_scores(items: Sequence[tuple[Tensor, Rule]], kind: str, size: int) -> Tensor:
    """Sum of normalised magnitudes over every axis of `kind` (qkv axes fold into inner channels)."""
    total = torch.zeros(size)
    for t, rule in items:
        for axis, k in enumerate(rule):
            if k == kind:
                total += _abs_mass(t, axis).cpu()
            elif kind == "inner" and k == "qkv":
                total += _abs_mass(t, axis).cpu().view(3, -1).sum(0)
    return total


def _layer_selection(spec: str | Mapping[str, Sequence[int]], tower: str, t_depth: int, s_depth: int) -> list[int]:
    if isinstance(spec, str):
        layers = LAYER_SELECTION.get(spec)(t_depth, s_depth)
    else:
        if tower not in spec:
            raise ConfigError(f"layers: explicit layer indices given but none for the {tower} tower")
        layers = [int(i) for i in spec[tower]]
    if len(layers) != s_depth:
        raise ConfigError(f"layers.{tower}: {len(layers)} indices for a student of depth {s_depth}")
    if any(not 0 <= i < t_depth for i in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"layers.{tower}: indices {layers} must be distinct and in [0, {t_depth})")
    return layers


def _plan_tower(
    t: _Tower, s: _Tower, t_state: Mapping[str, Tensor], layers: str | Mapping, pick: Callable
) -> _TowerPlan:
    if s.depth > t.depth or s.width > t.width:
        raise ConfigError(
            f"{t.name} tower: the student ({s.depth} layers × {s.width}) is larger than the teacher "
            f"({t.depth} × {t.width}); inheritance only shrinks"
        )
    chosen = _layer_selection(layers, t.name, t.depth, s.depth)

    def block_items(i: int) -> list[tuple[Tensor, Rule]]:
        pre = f"{t.prefix}transformer.resblocks.{i}."
        return [(v, BLOCK_RULES[k[len(pre):]]) for k, v in t_state.items() if k.startswith(pre)
                and k[len(pre):] in BLOCK_RULES]

    def res_scores() -> Tensor:
        items = [(v, t.rules[k[len(t.prefix):]]) for k, v in t_state.items()
                 if k.startswith(t.prefix) and k[len(t.prefix):] in t.rules]
        for i in chosen:
            items += block_items(i)
        return _channel_scores(items, "res", t.width)

    plan = _TowerPlan(res=pick(f"{t.name}.residual", res_scores, t.width, s.width))
    for j, i in enumerate(chosen):
        plan.layers.append(_plan_layer(t, s, i, j, block_items(i), pick))
    return plan


def _plan_layer(t: _Tower, s: _Tower, i: int, j: int, items: list[tuple[Tensor, Rule]], pick: Callable) -> _LayerPlan:
    """Heads, in-head dims and MLP channels that student layer j keeps of teacher layer i."""
    th, sh = t.heads(i), s.heads(j)
    t_hd, s_hd = t.width // th, s.width // sh
    if sh > th or s_hd > t_hd:
        raise ConfigError(
            f"{t.name} layer {j}: the student has {sh} heads of width {s_hd}, the teacher {th} of width {t_hd}; "
            "inheritance keeps whole heads, so the student needs no more heads and no wider heads"
        )
    tm, sm = t.mlp(i), s.mlp(j)
    if sm > tm:
        raise ConfigError(f"{t.name} layer {j}: student MLP width {sm} exceeds the teacher's {tm}")

    def per_head_dim() -> Tensor:
        return _channel_scores(items, "inner", t.width).view(th, t_hd)

    key = f"{t.name}.{i}"
    heads = pick(f"{key}.heads", lambda: per_head_dim().sum(1) + _channel_scores(items, "head", th), th, sh)
    hdim = pick(f"{key}.hdim", lambda: per_head_dim()[heads].sum(0) + _channel_scores(items, "hdim", t_hd), t_hd, s_hd)
    inner = (heads[:, None] * t_hd + hdim[None, :]).reshape(-1)
    mlp = pick(f"{key}.mlp", lambda: _channel_scores(items, "mlp", tm), tm, sm)
    return _LayerPlan(i, heads, hdim, inner, mlp)


def _resize_grid(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bicubically resize a ViT positional embedding [1 + h·w, D] to a new patch grid (class token kept)."""
    cls, rest = pos[:1], pos[1:]
    old = int(round(rest.shape[0] ** 0.5))
    if old * old != rest.shape[0]:
        raise ConfigError(f"cannot resize a non-square positional embedding with {rest.shape[0]} patches")
    img = rest.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    rest = img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([cls, rest], dim=0)


def _slice(t: Tensor, rule: Rule, index: Mapping[str, Tensor], key: str) -> Tensor:
    for axis, kind in enumerate(rule):
        if not kind:
            continue
        idx = index.get(kind)
        if idx is None:
            raise ConfigError(f"inheritance: no '{kind}' channel plan for {key}")
        if kind == "qkv":
            n = t.shape[axis] // 3
            idx = torch.cat([idx, idx + n, idx + 2 * n])
        t = t.index_select(axis, idx.to(t.device))
    return t


def _check_vocab(t_sd: Mapping[str, Tensor], s_sd: Mapping[str, Tensor], key: str) -> None:
    if key in s_sd and t_sd[key].shape[0] != s_sd[key].shape[0]:
        raise ConfigError(
            f"{key}: the student's vocabulary ({s_sd[key].shape[0]}) differs from the teacher's "
            f"({t_sd[key].shape[0]}); students share the teacher's tokenizer"
        )


# ---------------------------------------------------------------------------------------------- entry point


@torch.no_grad()
def inherit_weights(
    teacher: nn.Module,
    student: nn.Module,
    *,
    layers: str | Mapping[str, Sequence[int]] = "uniform",
    channels: str = "first",
    scores: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Copy sliced teacher weights into `student` (both open_clip CLIP / CustomTextCLIP); returns what was kept.

    `layers`: "uniform", "first", or explicit teacher indices per tower (`{"vision": [...], "text": [...]}`).
    `channels`: "first" or "importance" (L1 weight magnitude) for heads, MLP channels, residual and embedding
    channels. Towers that are not ViT / text transformers (timm, ResNet, Hugging Face) are copied when their
    shapes match the teacher's, and rejected otherwise. Every student tensor is set; nothing stays random.
    `scores` gives learned importance for some groups (keys `"{tower}.residual"`, `"{tower}.{layer}.heads"`,
    `".hdim"`, `".mlp"` with teacher layer indices, and `"embed"`); those groups keep their top-scoring channels.
    """
    select = CHANNEL_SELECTION.get(channels)
    scores = dict(scores or {})

    def pick(key: str, default: Callable[[], Tensor], total: int, keep: int) -> Tensor:
        if key in scores:
            return important_channels(lambda: scores[key].detach().float().cpu(), total, keep)
        return select(default, total, keep)

    if isinstance(layers, str):
        LAYER_SELECTION.get(layers)
    t_towers, s_towers = _towers(teacher), _towers(student)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    report: dict[str, Any] = {"layers": layers if isinstance(layers, str) else "explicit", "channels": channels}

    plans: dict[str, _TowerPlan | None] = {}
    for name in ("vision", "text"):
        t, s = t_towers[name], s_towers[name]
        if t.transformer is None or s.transformer is None:
            plans[name] = None  # copied as is below
            report[name] = {"mode": "copied"}
            continue
        plan = _plan_tower(t, s, t_sd, layers, pick)
        plans[name] = plan
        report[name] = {
            "mode": "sliced",
            "layers": [lp.teacher_layer for lp in plan.layers],
            "width": [t.width, s.width],
            "residual": plan.res.tolist(),
            "heads": {j: lp.heads.tolist() for j, lp in enumerate(plan.layers)},
            "mlp": [[t.mlp(lp.teacher_layer), len(lp.mlp)] for lp in plan.layers],
        }

    # one embedding-channel subset for both towers: the joint space must stay joint
    t_embed, s_embed = _embed_dim(teacher), _embed_dim(student)
    if s_embed > t_embed:
        raise ConfigError(f"embed_dim: the student's {s_embed} exceeds the teacher's {t_embed}")

    def embed_scores() -> Tensor:
        items = []
        for k, v in t_sd.items():
            tower, rel = _split_key(k, t_towers)
            rule = t_towers[tower].rules.get(rel) if tower != "shared" else None
            if rule and "embed" in rule and plans.get(tower) is not None:
                items.append((v, rule))
        return _channel_scores(items, "embed", t_embed)

    embed = pick("embed", embed_scores, t_embed, s_embed)
    report["embed_dim"] = [t_embed, s_embed]

    _check_vocab(t_sd, s_sd, t_towers["text"].prefix + "token_embedding.weight")
    new_sd: dict[str, Tensor] = {}
    for key, s_val in s_sd.items():
        tower, rel = _split_key(key, s_towers)
        if key not in t_sd:
            raise ConfigError(
                f"inheritance: the student has '{key}' but the teacher does not; teacher and student must share "
                "an architecture family (same block type, pooling and projections)"
            )
        t_val = t_sd[key]
        plan = plans.get(tower) if tower != "shared" else None
        if tower == "shared" or plan is None:
            if tuple(t_val.shape) != tuple(s_val.shape):
                raise ConfigError(
                    f"inheritance: cannot slice '{key}' ({list(t_val.shape)} → {list(s_val.shape)}); only ViT and "
                    "text-transformer towers can shrink, other towers must keep the teacher's shape"
                )
            new_sd[key] = t_val.to(dtype=s_val.dtype).clone()
            continue
        idx = {"res": plan.res, "embed": embed}
        m = _BLOCK.match(rel)
        if m:
            lp = plan.layers[int(m.group(1))]
            rel = m.group(2)
            rule = BLOCK_RULES.get(rel)
            t_key = f"{t_towers[tower].prefix}transformer.resblocks.{lp.teacher_layer}.{rel}"
            t_val = t_sd[t_key]
            idx.update(qkv=lp.inner, inner=lp.inner, head=lp.heads, hdim=lp.hdim, mlp=lp.mlp)
        else:
            rule = s_towers[tower].rules.get(rel)
        if rule is None:
            raise ConfigError(f"inheritance: no slicing rule for '{key}' {list(s_val.shape)}; this tower type is "
                              "not supported for shrinking")
        if rel == "positional_embedding" and tower == "text":
            if s_val.shape[0] > t_val.shape[0]:
                raise ConfigError(f"text context length: the student's {s_val.shape[0]} exceeds the teacher's "
                                  f"{t_val.shape[0]}")
            idx["ctx"] = torch.arange(s_val.shape[0])
        value = _slice(t_val, rule, idx, key)
        if rel == "positional_embedding" and tower == "vision" and value.shape[0] != s_val.shape[0]:
            value = _resize_grid(value, tuple(student.visual.grid_size))
            report["vision"]["positional_embedding"] = "resized"
        if tuple(value.shape) != tuple(s_val.shape):
            raise ConfigError(f"inheritance: '{key}' sliced to {list(value.shape)}, the student needs "
                              f"{list(s_val.shape)}")
        new_sd[key] = value.to(dtype=s_val.dtype).clone()
    student.load_state_dict(new_sd, strict=True)
    report["tensors"] = len(new_sd)
    return report


def _embed_dim(model: nn.Module) -> int:
    from xmodal.adapters.clip import clip_embed_dim

    return int(clip_embed_dim(model))


def inherit_from_model_cfg(
    teacher: nn.Module,
    student_cfg: Mapping[str, Any],
    *,
    layers: str | Mapping[str, Sequence[int]] = "uniform",
    channels: str = "first",
    preprocess_cfg: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the student described by `student_cfg` and initialise it from `teacher`; returns (student, report)."""
    from xmodal.students.clip import create_student

    student = create_student(student_cfg, preprocess_cfg)
    device = next(teacher.parameters()).device
    student = student.to(device)
    report = inherit_weights(teacher, student, layers=layers, channels=channels)
    return student, report


__all__ = [
    "CHANNEL_SELECTION",
    "LAYER_SELECTION",
    "first_channels",
    "first_layers",
    "important_channels",
    "inherit_from_model_cfg",
    "inherit_weights",
    "uniform_layers",
]

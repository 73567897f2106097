"""Small CLIP students: open_clip model configs shrunk from a teacher's (depth, width, heads, MLP ratio per tower).

A shrink size is absolute (an integer ≥ 1), a fraction of the teacher's value (a number in (0, 1)) or a
percentage string ("75%"). Fractions always refer to the teacher config given, so progressive stages
(100% → 75% → 50%) are all measured against the original teacher.

The "open_clip" student kind is registered here; `create_student` is the core factory (`xmodal.models`) and the
open_clip helpers (`model_cfg_of`, `read_open_clip_config`, transforms) live in `xmodal.openclip`, re-exported.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from xmodal.errors import ConfigError
from xmodal.models import create_student, register_student
from xmodal.openclip import (
    build_open_clip,
    clip_transforms,
    is_clip_model_cfg,
    model_cfg_of,
    read_open_clip_config,
)

Size = int | float | str  # absolute (int ≥ 1), fraction in (0, 1), or "N%"

VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224}
TEXT_DEFAULTS = {"layers": 12, "width": 512, "heads": 8, "mlp_ratio": 4.0, "context_length": 77, "vocab_size": 49408}


@dataclass
class TowerShrink:
    """Target depth/width/heads/MLP ratio of one tower; None keeps the teacher's value."""

    layers: Size | None = None
    width: Size | None = None
    heads: Size | None = None
    mlp_ratio: float | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in asdict(self).values())


@dataclass
class VisionShrink(TowerShrink):
    """Vision tower target; `image_size` may differ from the teacher's (positional embeddings are resized)."""

    image_size: int | None = None


@dataclass
class TextShrink(TowerShrink):
    """Text tower target; `context_length` may be shorter than the teacher's."""

    context_length: int | None = None


@dataclass
class ShrinkSpec:
    """How a student is derived from a teacher config: per-tower targets plus the joint embedding width.

    `embed_dim` defaults to the teacher's, so affinity and feature losses compare embeddings without a projector.
    """

    vision: VisionShrink = field(default_factory=VisionShrink)
    text: TextShrink = field(default_factory=TextShrink)
    embed_dim: Size | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "shrink") -> ShrinkSpec:
        """Validate a YAML mapping such as `{vision: {layers: 6, width: 0.5}, text: {width: "50%"}}`."""
        from xmodal.config import from_dict

        return from_dict(cls, dict(data or {}), source=source)


def as_shrink_spec(spec: ShrinkSpec | Mapping[str, Any] | None, source: str = "shrink") -> ShrinkSpec:
    if isinstance(spec, ShrinkSpec):
        return spec
    return ShrinkSpec.from_dict(spec, source)


def resolve_size(value: Size | None, ref: int, key: str, multiple: int = 1) -> int:
    """Turn an absolute / fractional / percentage size into an integer ≤ `ref`, rounded to `multiple`."""
    if value is None:
        return ref
    frac: float | None = None
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            raise ConfigError(f"{key}: '{value}' is not a size; write an integer, a fraction like 0.5 or '50%'")
        try:
            frac = float(text[:-1]) / 100.0
        except ValueError as e:
            raise ConfigError(f"{key}: '{value}' is not a percentage like '50%'") from e
        if not 0 < frac <= 1:
            raise ConfigError(f"{key}: percentage {value} must be in (0%, 100%]")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected an integer, a fraction or a percentage, got {value!r}")
    elif 0 < value < 1:
        frac = float(value)
    elif value >= 1 and float(value).is_integer():
        out = int(value)
        if out > ref:
            raise ConfigError(f"{key}: {out} exceeds the teacher's {ref}; a student can only be smaller or equal")
        if out % multiple:
            raise ConfigError(f"{key}: {out} must be a multiple of {multiple}")
        return out
    else:
        raise ConfigError(f"{key}: {value!r} is neither a fraction in (0, 1) nor a whole number ≥ 1")
    return max(multiple, int(round(frac * ref / multiple)) * multiple)


def _tower_kind(cfg: Mapping[str, Any], tower: str) -> str | None:
    """None for towers shrinking supports (ViT, open_clip text transformer), else a description."""
    if tower == "vision":
        if cfg.get("timm_model_name"):
            return f"a timm tower ({cfg['timm_model_name']})"
        if isinstance(cfg.get("layers"), (list, tuple)):
            return "a ModifiedResNet tower"
        if cfg.get("attentional_pool"):
            return "a ViT with an attentional pooler"
    elif cfg.get("hf_model_name"):
        return f"a Hugging Face text tower ({cfg['hf_model_name']})"
    return None


def _shrink_width(tcfg: dict, spec: TowerShrink, key: str, vision: bool) -> tuple[int, int]:
    """Student (width, heads); head width stays the teacher's unless heads are given."""
    defaults = VISION_DEFAULTS if vision else TEXT_DEFAULTS
    t_width = int(tcfg.get("width", defaults["width"]))
    if vision:
        t_head_width = int(tcfg.get("head_width", defaults["head_width"]))
        t_heads = t_width // t_head_width
    else:
        t_heads = int(tcfg.get("heads", defaults["heads"]))
        t_head_width = t_width // t_heads
    if spec.heads is None:
        width = resolve_size(spec.width, t_width, f"{key}.width", multiple=t_head_width)
        return width, width // t_head_width
    heads = resolve_size(spec.heads, t_heads, f"{key}.heads")
    width = resolve_size(spec.width, t_width, f"{key}.width", multiple=heads)
    if width % heads:
        raise ConfigError(f"{key}: width {width} is not divisible by heads {heads}")
    return width, heads


def shrink_model_cfg(teacher_cfg: Mapping[str, Any], spec: ShrinkSpec | Mapping[str, Any] | None) -> dict:
    """An open_clip model_cfg (`embed_dim`, `vision_cfg`, `text_cfg`, ...) for a student shrunk from `teacher_cfg`."""
    spec = as_shrink_spec(spec)
    for k in ("embed_dim", "vision_cfg", "text_cfg"):
        if k not in teacher_cfg:
            raise ConfigError(f"teacher model_cfg lacks '{k}'; expected an open_clip config (see model_cfg_of)")
    cfg = copy.deepcopy(dict(teacher_cfg))
    cfg["embed_dim"] = resolve_size(spec.embed_dim, int(teacher_cfg["embed_dim"]), "shrink.embed_dim")
    for tower, tspec, cfg_key in (("vision", spec.vision, "vision_cfg"), ("text", spec.text, "text_cfg")):
        tcfg = cfg[cfg_key]
        if tspec.is_empty():
            continue
        kind = _tower_kind(tcfg, tower)
        if kind is not None:
            raise ConfigError(
                f"shrink.{tower}: the teacher's {tower} tower is {kind}; shrinking supports ViT image towers and "
                f"open_clip text transformers. Leave shrink.{tower} empty to keep that tower as it is"
            )
        key = f"shrink.{tower}"
        defaults = VISION_DEFAULTS if tower == "vision" else TEXT_DEFAULTS
        tcfg["layers"] = resolve_size(tspec.layers, int(tcfg.get("layers", defaults["layers"])), f"{key}.layers")
        width, heads = _shrink_width(tcfg, tspec, key, vision=tower == "vision")
        tcfg["width"] = width
        if tower == "vision":
            tcfg["head_width"] = width // heads
        else:
            tcfg["heads"] = heads
        if tspec.mlp_ratio is not None:
            t_ratio = float(tcfg.get("mlp_ratio", defaults["mlp_ratio"]))
            if not 0 < tspec.mlp_ratio <= t_ratio:
                raise ConfigError(f"{key}.mlp_ratio: {tspec.mlp_ratio} must be in (0, {t_ratio}] (the teacher's)")
            tcfg["mlp_ratio"] = float(tspec.mlp_ratio)
        if isinstance(tspec, VisionShrink) and tspec.image_size is not None:
            patch = int(tcfg.get("patch_size", defaults["patch_size"]))
            if tspec.image_size % patch:
                raise ConfigError(f"{key}.image_size: {tspec.image_size} must be a multiple of the patch size {patch}")
            tcfg["image_size"] = int(tspec.image_size)
        if isinstance(tspec, TextShrink) and tspec.context_length is not None:
            t_ctx = int(tcfg.get("context_length", defaults["context_length"]))
            if not 0 < tspec.context_length <= t_ctx:
                raise ConfigError(f"{key}.context_length: {tspec.context_length} must be in [1, {t_ctx}]")
            tcfg["context_length"] = int(tspec.context_length)
    return cfg


def _tower_sizes(cfg: Mapping[str, Any]) -> dict[str, float]:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    sizes = {"embed_dim": cfg["embed_dim"]}
    for name, c, d in (("vision", v, VISION_DEFAULTS), ("text", t, TEXT_DEFAULTS)):
        if _tower_kind(c, name) is None:
            width = c.get("width", d["width"])
            sizes[f"{name}.layers"] = c.get("layers", d["layers"])
            sizes[f"{name}.width"] = width
            sizes[f"{name}.mlp_channels"] = int(width * c.get("mlp_ratio", d["mlp_ratio"]))
    return sizes


def progressive_model_cfgs(
    teacher_cfg: Mapping[str, Any], specs: Sequence[ShrinkSpec | Mapping[str, Any]]
) -> list[dict]:
    """One model_cfg per stage (fractions relative to the teacher); each stage must fit inside the previous one."""
    out: list[dict] = []
    prev = dict(teacher_cfg)
    for i, spec in enumerate(specs):
        cfg = shrink_model_cfg(teacher_cfg, as_shrink_spec(spec, f"stages[{i}].shrink"))
        before, after = _tower_sizes(prev), _tower_sizes(cfg)
        for k, v in after.items():
            if k in before and v > before[k]:
                raise ConfigError(
                    f"stages[{i}].shrink: {k} = {v} is larger than the previous stage's {before[k]}; "
                    "each stage inherits from the last, so sizes may only stay or shrink"
                )
        out.append(cfg)
        prev = cfg
    return out


@register_student("open_clip", family="clip", accepts=is_clip_model_cfg)
def build_clip_student(
    model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None, *, device: Any = None
) -> nn.Module:
    """Student kind "open_clip": an open_clip CLIP from a model_cfg, randomly initialised, carrying its own
    preprocessing config (`xmodal.openclip.build_open_clip`). `create_student(model_cfg, preprocess_cfg)` builds it.
    """
    return build_open_clip(model_cfg, preprocess_cfg, device=device)


student_transforms = clip_transforms  # (train, eval) transforms from the model's own preprocessing config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model_cfg(cfg: Mapping[str, Any]) -> str:
    """One line summary like `vision 6L×384 (6 heads) | text 6L×256 (4 heads) | embed 512`."""
    parts = []
    for name, key, d in (("vision", "vision_cfg", VISION_DEFAULTS), ("text", "text_cfg", TEXT_DEFAULTS)):
        c = cfg.get(key, {})
        kind = _tower_kind(c, name)
        if kind:
            parts.append(f"{name} {kind}")
            continue
        width = c.get("width", d["width"])
        heads = width // c.get("head_width", d["head_width"]) if name == "vision" else c.get("heads", d["heads"])
        parts.append(f"{name} {c.get('layers', d['layers'])}L×{width} ({heads} heads)")
    parts.append(f"embed {cfg.get('embed_dim')}")
    return " | ".join(parts)


__all__ = [
    "ShrinkSpec",
    "TextShrink",
    "TowerShrink",
    "VisionShrink",
    "as_shrink_spec",
    "build_clip_student",
    "count_parameters",
    "create_student",
    "describe_model_cfg",
    "model_cfg_of",
    "progressive_model_cfgs",
    "read_open_clip_config",
    "resolve_size",
    "shrink_model_cfg",
    "student_transforms",
]

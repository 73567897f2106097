"""open_clip models as xmodal uses them: the `ClipBundle` (model + preprocessing + tokenizer + identity), built
from a model_cfg or around a loaded model, and open_clip configs read from names and folders.

Teachers (`xmodal.teachers.clip`) and students (`xmodal.students.clip`) both hand out `ClipBundle`s, so it lives
in the core, below both.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from xmodal.errors import ConfigError


@dataclass(eq=False)
class ClipBundle:
    """An open_clip model with what it takes to use it: eval and train transforms, tokenizer, its open_clip
    model_cfg and preprocessing config, and its identity (`fingerprint`: weights + preprocessing + tokenizer)."""

    model: nn.Module
    preprocess: Callable  # eval transform
    preprocess_train: Callable  # train transform (augmented)
    tokenizer: Callable
    name: str = "open_clip"
    pretrained: str | None = None
    model_cfg: dict | None = None
    preprocess_cfg: dict = field(default_factory=dict)
    _fingerprint: tuple[Any, str] | None = field(default=None, init=False, repr=False)

    @property
    def eval_transform(self) -> Callable:
        return self.preprocess

    @property
    def train_transform(self) -> Callable:
        return self.preprocess_train

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    def identity_extra(self) -> dict[str, Any]:
        """Everything besides the weights that decides the model's outputs for a raw image or caption."""
        tok = self.tokenizer
        return {"model_cfg": self.model_cfg, "preprocess": self.preprocess_cfg,
                "tokenizer": {"type": type(tok).__name__, "context_length": getattr(tok, "context_length", None)}}

    @property
    def fingerprint(self) -> str:
        """The model's identity (`xmodal.fingerprint.model_fingerprint`), recomputed when the weights changed."""
        from xmodal.fingerprint import model_fingerprint

        stamp = _weights_stamp(self.model)
        if stamp is None or self._fingerprint is None or self._fingerprint[0] != stamp:
            self._fingerprint = (stamp, model_fingerprint(self.model, self.identity_extra()))
        return self._fingerprint[1]

    def loaded(self, name: str | None = None) -> ClipBundle:
        """This bundle (kept for callers written against the older split into two bundle types)."""
        return self


def _weights_stamp(model: nn.Module) -> tuple | None:
    """Storage and in-place version of every tensor: changes whenever an optimizer step or load touches them."""
    try:
        return tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    except RuntimeError:  # inference tensors have no version counter: always recompute
        return None


# ---------------------------------------------------------------- building


def _preprocess_cfg(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None) -> dict:
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    merged = merge_preprocess_dict(PreprocessCfg(), dict(preprocess_cfg or {}))
    merged["size"] = model_cfg.get("vision_cfg", {}).get("image_size", merged["size"])
    return merged


def build_open_clip(
    model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None, *, device: Any = None
) -> nn.Module:
    """Build an open_clip CLIP (or CustomTextCLIP when `custom_text`) from a model_cfg dict, randomly initialised.

    The model carries its preprocessing config (open_clip's `visual.preprocess_cfg`), so its transforms and
    exports use its own image size. Nothing is downloaded: pretrained tower flags are switched off.
    """
    import open_clip

    cfg = copy.deepcopy(dict(model_cfg))
    if "multimodal_cfg" in cfg:
        raise ConfigError("model_cfg has 'multimodal_cfg' (a CoCa model); students are contrastive CLIP models")
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    custom_text = bool(cfg.pop("custom_text", False)) or bool(text_cfg.get("hf_model_name"))
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_pretrained"] = False  # weights come from inheritance or training, never a download
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = cls(**cfg)
    except (TypeError, AssertionError, ValueError) as e:
        raise ConfigError(f"cannot build an open_clip model from this model_cfg: {type(e).__name__}: {e}") from e
    open_clip.set_model_preprocess_cfg(model, _preprocess_cfg(model_cfg, preprocess_cfg))
    if device is not None:
        model = model.to(device)
    return model


def clip_transforms(model: nn.Module, aug_cfg: Mapping[str, Any] | None = None):
    """(train, eval) image transforms from the model's own preprocessing config."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    return image_transform_v2(pp, is_train=True, aug_cfg=dict(aug_cfg or {})), image_transform_v2(pp, is_train=False)


def bundle_model(model: nn.Module, model_cfg: Mapping[str, Any], *, name: str = "open_clip",
                 pretrained: str | None = None) -> ClipBundle:
    """A bundle around a model built from `model_cfg`: transforms from its preprocessing config, a tokenizer with
    its own context length."""
    import open_clip

    train_tf, eval_tf = clip_transforms(model)
    ctx = model_cfg.get("text_cfg", {}).get("context_length", 77)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
    return ClipBundle(model, eval_tf, train_tf, tokenizer, name, pretrained, copy.deepcopy(dict(model_cfg)),
                      dict(open_clip.get_model_preprocess_cfg(model)))


# ---------------------------------------------------------------- configs


def read_open_clip_config(path: str | os.PathLike) -> dict:
    """Read `open_clip_config.json` (a folder or the file) → `{"model_cfg": ..., "preprocess_cfg": ...}`."""
    path = Path(path)
    if path.is_dir():
        path = path / "open_clip_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found; an open_clip folder needs open_clip_config.json") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with 'model_cfg'")
    if "model_cfg" not in data:
        if "vision_cfg" in data and "text_cfg" in data:
            data = {"model_cfg": data}
        else:
            raise ConfigError(f"{path}: missing 'model_cfg' (keys: {', '.join(data) or 'none'})")
    data.setdefault("preprocess_cfg", {})
    return data


def model_cfg_of(source: Any, pretrained: str | None = None) -> dict:
    """An open_clip model_cfg from a name, a `local-dir:`/`hf-hub:` id, a folder or a loaded bundle.

    Loaded models (anything with `.name` and `.pretrained`, like `ClipBundle`) resolve through their name and
    pretrained source, or their own `model_cfg` when they carry one.
    """
    import open_clip

    if not isinstance(source, (str, os.PathLike)):
        if getattr(source, "model_cfg", None) is not None:
            return copy.deepcopy(dict(source.model_cfg))
        if hasattr(source, "name"):
            return model_cfg_of(source.name, getattr(source, "pretrained", None))
        raise ConfigError(
            f"model_cfg_of: expected a model name, a folder or a loaded teacher, got {type(source).__name__}"
        )
    name = str(source)
    if name.startswith("local-dir:"):
        return read_open_clip_config(name[len("local-dir:"):])["model_cfg"]
    if Path(name).is_dir():
        return read_open_clip_config(name)["model_cfg"]
    if pretrained and Path(pretrained).is_dir():
        return read_open_clip_config(pretrained)["model_cfg"]
    cfg = open_clip.get_model_config(name if name.startswith("hf-hub:") else name.replace("/", "-"))
    if cfg is None:
        from xmodal.registry import suggest

        known = open_clip.list_models()
        raise ConfigError(
            f"no open_clip model config named '{name}'{suggest(name, known)}; use a name from "
            "open_clip.list_models() or a folder with open_clip_config.json"
        )
    return copy.deepcopy(cfg)


def is_clip_model_cfg(cfg: Any) -> bool:
    """True for an open_clip model_cfg mapping (what a CLIP student is built from)."""
    return isinstance(cfg, Mapping) and ("vision_cfg" in cfg or "text_cfg" in cfg)


__all__ = [
    "ClipBundle",
    "build_open_clip",
    "bundle_model",
    "clip_transforms",
    "is_clip_model_cfg",
    "model_cfg_of",
    "read_open_clip_config",
]

"""Load any open_clip model as a teacher: name + pretrained tag, a local checkpoint file or a local folder.

Registered as the "open_clip" teacher kind (`xmodal.models.create_teacher`); returns a `ClipBundle`.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

from xmodal.device import resolve_device
from xmodal.errors import CheckpointError, ConfigError
from xmodal.models import TEACHERS, config_value, register_teacher
from xmodal.openclip import ClipBundle, build_open_clip, bundle_model, model_cfg_of
from xmodal.registry import suggest
from xmodal.weights import error_detail, is_unsafe_pickle, safe_cause, weights_error

log = logging.getLogger(__name__)

LoadedCLIP = ClipBundle  # the name loaders and evaluators used before the bundle types were merged

__all__ = ["TEACHERS", "ClipBundle", "LoadedCLIP", "load_open_clip", "open_clip_teacher", "resolve_model_source"]


def resolve_model_source(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Map (name, pretrained) to open_clip arguments: a folder becomes `local-dir:`; tags and files pass."""
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    if Path(name).is_dir():
        return f"local-dir:{name}", None
    if pretrained and Path(pretrained).is_dir():
        return f"local-dir:{pretrained}", None
    known = open_clip.list_models()
    if name.replace("/", "-") not in known:
        raise ConfigError(
            f"unknown open_clip model '{name}'{suggest(name, known)}; use a name from open_clip.list_models(), "
            "'hf-hub:org/repo', or a local folder with open_clip_config.json"
        )
    if pretrained and not os.path.isfile(pretrained):
        tags = [t for n, t in open_clip.list_pretrained() if n == name]
        looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            raise ConfigError(f"pretrained checkpoint file not found: {pretrained}")
        if pretrained not in tags:
            raise ConfigError(
                f"'{pretrained}' is neither a file nor a pretrained tag of {name}{suggest(pretrained, tags)}; "
                f"tags: {', '.join(tags) or 'none'}"
            )
    return name, pretrained


def _weights_file(model_name: str, tag: str | None) -> str:
    """The file open_clip reads the weights from, for error messages (the folder's chosen file for local-dir)."""
    if tag and os.path.isfile(tag):
        return tag
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        try:
            from open_clip.factory import _find_checkpoint_in_dir

            found = _find_checkpoint_in_dir(folder)
        except (ImportError, OSError):
            found = None
        return found or str(folder)
    return model_name


def load_open_clip(
    name: str, pretrained: str | None = None, *, device: str = "cpu", frozen: bool = True, **kwargs: Any
) -> ClipBundle:
    """Create an open_clip model with its transforms and tokenizer; `frozen` puts it in eval mode, no grads."""
    import open_clip

    model_name, tag = resolve_model_source(name, pretrained)
    try:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=resolve_device(device), weights_only=True, **kwargs
        )
    except pickle.UnpicklingError as e:
        raise weights_error(_weights_file(model_name, tag), e, "open_clip weights file") from safe_cause(e)
    except (RuntimeError, OSError, ValueError) as e:
        if is_unsafe_pickle(e.__cause__ or e):
            raise weights_error(_weights_file(model_name, tag), e.__cause__ or e, "open_clip weights file") from None
        if tag and not os.path.isfile(tag):
            raise CheckpointError(
                f"could not fetch pretrained weights '{tag}' for {model_name}: {error_detail(e)}. On a machine "
                "without internet, pass a local checkpoint file (--pretrained PATH) or a local open_clip folder instead"
            ) from e
        raise CheckpointError(
            f"could not load open_clip model {model_name} from {_weights_file(model_name, tag)}: {error_detail(e)}"
        ) from e
    tokenizer = open_clip.get_tokenizer(model_name)
    if frozen:
        model.eval().requires_grad_(False)
    try:
        model_cfg = model_cfg_of(name, pretrained)
    except ConfigError:  # e.g. an hf-hub model: its config is not needed to run it
        model_cfg = None
    return ClipBundle(model, pre_val, pre_train, tokenizer, name, pretrained, model_cfg,
                      dict(open_clip.get_model_preprocess_cfg(model)))


def _looks_like_clip_teacher(cfg: Any) -> bool:
    return config_value(cfg, "kind") is None and (
        config_value(cfg, "model") is not None or config_value(cfg, "model_cfg") is not None
    ) and config_value(cfg, "path") is None


@register_teacher("open_clip", family="clip", accepts=_looks_like_clip_teacher)
def open_clip_teacher(cfg: Any, *, device: Any = "cpu", frozen: bool = True) -> ClipBundle:
    """The teacher of a config with `model` (+ `pretrained`) or `model_cfg` (randomly initialised, to be trained).

    The bundle always carries the open_clip model_cfg: a student is shrunk from it.
    """
    model_cfg = config_value(cfg, "model_cfg")
    name, pretrained = config_value(cfg, "model"), config_value(cfg, "pretrained")
    if (name is None) == (model_cfg is None):
        raise ConfigError("an open_clip teacher needs exactly one of 'model' (name or folder) or 'model_cfg'")
    if model_cfg is not None:
        model = build_open_clip(model_cfg, device=resolve_device(str(device)))
        if frozen:
            model.eval().requires_grad_(False)
        return bundle_model(model, model_cfg)
    bundle = load_open_clip(name, pretrained, device=str(device), frozen=frozen)
    if bundle.model_cfg is None:
        bundle.model_cfg = model_cfg_of(name, pretrained)  # raises the ConfigError that says why there is none
    return bundle

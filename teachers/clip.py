"""Load any open_clip model as a teacher: name + pretrained tag, a local checkpoint file or a local folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from xmodal.device import resolve_device
from xmodal.errors import CheckpointError, ConfigError
from xmodal.fingerprint import model_fingerprint
from xmodal.registry import Registry, suggest

log = logging.getLogger(__name__)

TEACHERS: Registry = Registry("teacher")


@dataclass
class LoadedCLIP:
    """An open_clip model with its own preprocessing and tokenizer."""

    model: nn.Module
    preprocess: Any  # eval transform
    preprocess_train: Any  # train transform (augmented)
    tokenizer: Any
    name: str
    pretrained: str | None
    fingerprint: str

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return size[0] if isinstance(size, (tuple, list)) else int(size)


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


@TEACHERS.register("open_clip")
def load_open_clip(
    name: str, pretrained: str | None = None, *, device: str = "cpu", frozen: bool = True, **kwargs: Any
) -> LoadedCLIP:
    """Create an open_clip model with its transforms and tokenizer; `frozen` puts it in eval mode, no grads."""
    import open_clip

    model_name, tag = resolve_model_source(name, pretrained)
    try:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, device=resolve_device(device), weights_only=True, **kwargs
        )
    except (RuntimeError, OSError, ValueError) as e:
        if tag and not os.path.isfile(tag):
            raise CheckpointError(
                f"could not fetch pretrained weights '{tag}' for {model_name}: {e}. On a machine without internet, "
                "pass a local checkpoint file (--pretrained PATH) or a local open_clip folder instead"
            ) from e
        raise CheckpointError(f"could not load open_clip model {model_name} (pretrained={tag}): {e}") from e
    tokenizer = open_clip.get_tokenizer(model_name)
    if frozen:
        model.eval().requires_grad_(False)
    pre_cfg = getattr(model.visual, "preprocess_cfg", None) or {"image_size": getattr(model.visual, "image_size", None)}
    return LoadedCLIP(
        model=model,
        preprocess=pre_val,
        preprocess_train=pre_train,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        fingerprint=model_fingerprint(model, {"preprocess": pre_cfg, "name": model_name}),
    )

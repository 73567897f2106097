"""Shared test fixtures: tiny open_clip models that build in milliseconds on CPU."""

import pytest
import torch


def tiny_clip_cfg(embed_dim: int = 32, width: int = 64, layers: int = 2) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": width // 16, "layers": layers},
    }


def write_tiny_clip_dir(root, embed_dim: int = 32, width: int = 32, layers: int = 1, seed: int = 0):
    """A local open_clip folder (open_clip_config.json + weights) holding a tiny random CLIP; returns `root`."""
    import json

    import open_clip

    cfg = tiny_clip_cfg(embed_dim=embed_dim, width=width, layers=layers)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    return root


@pytest.fixture
def tiny_clip():
    """Factory: tiny_clip(embed_dim=32, width=64, layers=2, seed=0) -> open_clip CLIP."""
    import open_clip

    def make(embed_dim=32, width=64, layers=2, seed=0):
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**tiny_clip_cfg(embed_dim, width, layers)).eval()

    return make

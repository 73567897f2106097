"""BEV detector teachers: a trained detector file (`save_detector`) loaded frozen, any sensor (LiDAR, camera)."""

from __future__ import annotations

from typing import Any

import torch

from xmodal.errors import ConfigError
from xmodal.models import config_value, register_teacher
from xmodal.nn.bev import BEVDetector, load_detector


@register_teacher("bev_detector", family="bev")
def load_bev_teacher(cfg: Any, *, device: torch.device | str = "cpu", **context: Any) -> BEVDetector:
    """cfg.path: a detector file; the model comes back in eval mode with gradients off."""
    path = config_value(cfg, "path")
    if not path:
        raise ConfigError("teacher (bev_detector): give 'path', a detector file written by the BEV job or "
                          "save_detector")
    model = load_detector(path, map_location=device)
    model.requires_grad_(False)
    return model.eval()

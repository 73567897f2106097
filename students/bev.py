"""BEV detector students (camera or LiDAR): the core's `BEVDetector` built from a `BEVDetectorConfig`.

A camera student learns from a LiDAR teacher (or the reverse) through the UniDistill losses; its projections
into the teacher's widths are added by the job (`BEVDetector.project_to`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xmodal.config import from_dict
from xmodal.models import register_student
from xmodal.nn.bev import BEVDetector, BEVDetectorConfig


@register_student("bev_detector", family="bev", accepts=lambda cfg: isinstance(cfg, BEVDetectorConfig))
def build_bev_student(cfg: BEVDetectorConfig | Mapping[str, Any], **context: Any) -> BEVDetector:
    """A new detector; `cfg` is a BEVDetectorConfig or its plain-dict form."""
    if not isinstance(cfg, BEVDetectorConfig):
        cfg = from_dict(BEVDetectorConfig, cfg, source="student")
    return BEVDetector(cfg)

"""Score a BEV detector on scenes: decode every batch, then the nuScenes-style metrics (`metrics.py`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from xmodal.device import resolve_device
from xmodal.engine.data import to_device
from xmodal.nn.bev import BEVDetector, DecodeConfig
from xmodal.tasks.bev.metrics import detection_metrics


@torch.no_grad()
def evaluate_detection(model: BEVDetector, loader: Iterable[Mapping[str, Any]], classes: Sequence[str], *,
                       decode: DecodeConfig | None = None, device: str | torch.device | None = None,
                       max_batches: int | None = None) -> dict[str, Any]:
    """mAP, NDS, TP errors and per-class results of `model` over the loader's scenes (boxes on the grid only)."""
    device = resolve_device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    preds, gts, start = [], [], time.perf_counter()
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(batch, device)
            for det, boxes, labels, mask in zip(model.detect(batch, decode), batch["boxes"], batch["box_labels"],
                                                batch["box_mask"]):
                preds.append({k: v.cpu() for k, v in det.items()})
                gts.append({"boxes": boxes[mask].cpu(), "labels": labels[mask].cpu()})
    finally:
        model.train(was_training)
    out = detection_metrics(preds, gts, classes)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out

"""Base-to-novel evaluation: accuracy on base-class and on novel-class images, each classified over its own class
set, and their harmonic mean; agreement with the teacher for unlabelled validation images; the checkpoint choice.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xmodal.errors import DataError
from xmodal.tasks.prompt.classes import base_novel_split, harmonic_mean
from xmodal.tasks.prompt.data import ImageItem, PromptImages

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_items(encode: Callable[[Tensor], Tensor], items: Sequence[ImageItem], transform: Callable, *,
                batch_size: int = 256, device: str | torch.device = "cpu", source: str = "") -> Tensor:
    """L2-normalised embeddings [N, D] (float32, CPU) of every item's image in `transform`, by `encode`."""
    from xmodal.engine.data import collate_samples

    data = PromptImages(items, [("image", transform)], source=source)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    out = []
    for batch in loader:
        emb = encode(batch["image"].to(device)).float()
        out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
    return torch.cat(out)


def accuracy_over(emb: Tensor, labels: Tensor, class_vectors: Tensor, classes: Sequence[int]) -> tuple[float, int]:
    """Top-1 accuracy of the images whose label is in `classes`, classified over those classes only; (acc, count)."""
    classes = torch.as_tensor(list(classes), dtype=torch.long)
    position = torch.full((class_vectors.shape[0],), -1, dtype=torch.long)
    position[classes] = torch.arange(len(classes))
    target = position[labels]
    keep = target >= 0
    n = int(keep.sum())
    if n == 0:
        return math.nan, 0
    logits = emb[keep] @ class_vectors[classes].t()
    return float((logits.argmax(dim=1) == target[keep]).float().mean()), n


def base_novel_metrics(emb: Tensor, labels: Tensor, class_vectors: Tensor, classnames: Sequence[str]) -> dict[str, Any]:
    """{"base", "novel", "hm", "all"} accuracies and image counts. Base and novel images must both be present."""
    base, novel = base_novel_split(list(classnames))
    labels = torch.as_tensor(labels, dtype=torch.long)
    b, nb = accuracy_over(emb, labels, class_vectors, base)
    n, nn_ = accuracy_over(emb, labels, class_vectors, novel)
    missing = [what for what, count in (("base", nb), ("novel", nn_)) if count == 0]
    if missing:
        raise DataError(f"no images of the {' or '.join(missing)} classes to evaluate (base = the first "
                        f"{len(base)} classes by name); a base/novel evaluation needs images of both")
    every, _ = accuracy_over(emb, labels, class_vectors, range(len(classnames)))
    return {"base": b, "novel": n, "hm": harmonic_mean(b, n), "all": every, "n_base": nb, "n_novel": nn_}


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Share of images whose top class is the same for student and teacher."""
    return float((student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean())


# ---------------------------------------------------------------------------------------------- checkpoint choice


@dataclass
class Selection:
    """Validation-based choice of the prompts: the best value of `metric` seen so far, its step, and the file
    holding those prompts (written atomically when a new best appears). Ties keep the earlier step."""

    metric: str
    run_dir: Path
    best: float = -math.inf
    step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prompts_path(self) -> Path:
        return self.run_dir / "best_prompts.safetensors"

    @property
    def record_path(self) -> Path:
        return self.run_dir / "selection.json"

    def restore(self) -> None:
        """Take up the record of an interrupted run (on resume)."""
        import json

        if self.record_path.is_file() and self.prompts_path.is_file():
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
            if data.get("metric") == self.metric:
                self.best, self.step = float(data["value"]), int(data["step"])
                self.history = list(data.get("history", []))

    def update(self, value: float, step: int, save: Callable[[os.PathLike], Any]) -> bool:
        """Record `value` at `step`; a new best saves the prompts. Returns whether it was a new best."""
        from xmodal.io import atomic_write_json

        if not math.isfinite(value):
            raise DataError(f"validation {self.metric} is {value} at step {step}; it cannot choose a checkpoint")
        self.history = [h for h in self.history if h["step"] < step] + [{"step": step, self.metric: value}]
        improved = value > self.best
        if improved:
            save(self.prompts_path)
            self.best, self.step = value, step
        atomic_write_json(self.record_path, {"metric": self.metric, "value": self.best, "step": self.step,
                                             "history": self.history})
        return improved


__all__ = ["Selection", "accuracy_over", "agreement", "base_novel_metrics", "embed_items"]

"""The PromptKD teacher as the engine sees it: the frozen teacher image tower (or its cached outputs) and the
stored class vectors. It holds no text tower: `W_T` comes from the class vector file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.errors import DataError
from xmodal.features import Features

# What the prompt job's models fill: normalised image embeddings and logits over the class vectors.
PROMPT_PRODUCES: dict[str, tuple[str, ...]] = {"image": ("pooled", "logits")}
PROMPT_LOSS_HINT = ("the prompt_distill job's teacher and student give image embeddings and class logits over the "
                    "stored class vectors (no text features); use prompt_kd or another logit loss (hinton, dkd, ...)")


class PromptTeacher(nn.Module):
    """batch → {"image": Features(pooled=norm(t(x)), logits=τ_t·norm(t(x))·W_Tᵀ)} (logits only with class vectors).

    `visual` is the teacher's frozen image tower, reading `batch[image_key]`; with `cache` (a `TeacherCache` of
    this tower's pooled outputs), the embeddings come from the cache by `batch["ids"]` instead.
    """

    produces = PROMPT_PRODUCES

    def __init__(self, visual: nn.Module | None, class_vectors: Tensor | None = None, logit_scale: float = 100.0, *,
                 image_key: str = "teacher_image", cache: Any = None):
        super().__init__()
        if visual is None and cache is None:
            raise ValueError("PromptTeacher needs the teacher's image tower or a cache of its outputs")
        self.visual = visual.eval().requires_grad_(False) if visual is not None else None
        cv = torch.zeros(0, 0) if class_vectors is None else class_vectors.detach().float().clone()
        self.register_buffer("class_vectors", cv, persistent=False)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        self.image_key = image_key
        self.cache = cache  # not a module: nothing of it is moved, saved or trained

    def train(self, mode: bool = True) -> PromptTeacher:
        super().train(mode)
        if self.visual is not None:
            self.visual.eval()
        return self

    def embed(self, images: Tensor) -> Tensor:
        """norm(t(x)) for a batch of images in the teacher's own preprocessing."""
        return F.normalize(self.visual(images).float(), dim=-1)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        if self.cache is not None:
            pooled = self.cache(batch)["image"].pooled.to(self.logit_scale.device).float()
        else:
            if self.image_key not in batch:
                raise DataError(f"the teacher reads batch['{self.image_key}'], the batch has: {', '.join(batch)}")
            pooled = self.embed(batch[self.image_key])
        logits = self.logit_scale * pooled @ self.class_vectors.t() if self.class_vectors.numel() else None
        return {"image": Features(pooled=pooled, logits=logits)}


def teacher_logit_scale(model: nn.Module) -> float:
    """The teacher CLIP's own inverse temperature τ_t (`logit_scale.exp()`)."""
    scale = getattr(model, "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, Tensor) else 100.0


__all__ = ["PROMPT_LOSS_HINT", "PROMPT_PRODUCES", "PromptTeacher", "teacher_logit_scale"]

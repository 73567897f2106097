"""Audio and lip-video adapters over sequence encoders, plus attention-decoder context adapters for LIBS.

An encoder here is any module called as `encoder(x, mask)` that returns `(states [B, T, D], mask [B, T],
ctc_logits [B, T, V] or None)` — xmodal's `SpeechRecognizer` and `LipReader`, or a wrapped wav2vec2.

- `AudioAdapter` ("audio"): batch["audio"] (log-mel [B, Ta, F], or a waveform with batch_key="waveform") and
  batch["audio_mask"]; `VideoAdapter` ("video"): batch["video"] [B, T, 1, H, W] and batch["video_mask"].
  Features: pooled = masked mean of the states, tokens = states, mask, logits = CTC logits.
- `AudioContextAdapter` ("audio_context") / `VideoContextAdapter` ("video_context"): run the model's attention
  decoder teacher-forced on `<sos> + batch[target_key]`. Features: tokens = decoder states (LIBS context
  vectors) [B, L+1, D], mask = real decoder steps, logits = decoder logits (for `attention_ce`), pooled =
  masked mean. A context adapter reuses the encoder output its source adapter just computed for the same
  batch tensors, so the encoder runs once per step when both are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.adapters.base import ADAPTERS, ModalityAdapter
from xmodal.errors import DataError
from xmodal.features import Features
from xmodal.seqalign import decoder_io, masked_mean


def _encoder_width(encoder: nn.Module) -> int:
    for attr in ("width", "dim", "out_dim"):
        value = getattr(encoder, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot infer the state width of {type(encoder).__name__}; pass width= explicitly")


class SequenceAdapter(ModalityAdapter):
    """Reads batch[batch_key] and batch[mask_key] (default: f"{batch_key}_mask"; all frames real when absent)
    and runs a sequence encoder."""

    def __init__(self, encoder: nn.Module, width: int | None = None, *, frozen: bool = False,
                 batch_key: str | None = None, mask_key: str | None = None):
        super().__init__(encoder, width or _encoder_width(encoder), frozen=frozen, batch_key=batch_key)
        self.mask_key = mask_key or f"{self.batch_key or self.modality}_mask"
        self._memo: tuple[Tensor, Tensor | None, bool, tuple] | None = None

    def run_encoder(self, batch: Mapping[str, Any], *, reuse: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(states, mask, ctc_logits) for the batch; `reuse` takes the result of the last call on the very same
        input tensors (consumed once), which keeps the encoder to one pass when a context adapter follows."""
        x = self.inputs(batch)
        mask = batch.get(self.mask_key)
        memo, self._memo = self._memo, None
        if reuse and memo is not None and memo[0] is x and memo[1] is mask and memo[2] == torch.is_grad_enabled():
            return memo[3]
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(x.shape[:2])):
            raise DataError(f"batch['{self.mask_key}'] must be a bool [B, T] mask matching its inputs "
                            f"{list(x.shape[:2])}, got {mask.dtype} {list(mask.shape)}")
        states, out_mask, logits = tuple(self.encoder(x, mask))[:3]
        out = (states, out_mask, logits)
        if not reuse:
            self._memo = (x, mask, torch.is_grad_enabled(), out)
        return out

    def encode(self, batch: Mapping[str, Any]) -> Features:
        states, mask, logits = self.run_encoder(batch)
        return Features(pooled=masked_mean(states, mask), tokens=states, mask=mask, logits=logits)


@ADAPTERS.register("audio")
class AudioAdapter(SequenceAdapter):
    """batch['audio'] (+ 'audio_mask') → speech-encoder states, pooled summary and CTC logits."""

    modality = "audio"


@ADAPTERS.register("video")
class VideoAdapter(SequenceAdapter):
    """batch['video'] [B, T, 1, H, W] (+ 'video_mask') → lip-reader states, pooled summary and CTC logits."""

    modality = "video"


class ContextAdapter(ModalityAdapter):
    """Attention-decoder states and logits, teacher-forced on `<sos> + batch[target_key]`."""

    def __init__(self, source: SequenceAdapter, *, target_key: str = "targets", frozen: bool | None = None):
        model = source.encoder
        if not hasattr(model, "decode_teacher_forced"):
            raise ValueError(f"{type(model).__name__} has no attention decoder (decode_teacher_forced)")
        super().__init__(model, _encoder_width(model), frozen=source.frozen if frozen is None else frozen)
        self._source = (source,)  # a reference, not a submodule: its weights belong to the source adapter
        self.target_key = target_key

    @property
    def source(self) -> SequenceAdapter:
        return self._source[0]

    def encode(self, batch: Mapping[str, Any]) -> Features:
        if self.target_key not in batch:
            raise DataError(f"{type(self).__name__} reads batch['{self.target_key}'] (label ids padded with -1) "
                            f"but the batch has keys: {', '.join(batch)}")
        states, mask, _ = self.source.run_encoder(batch, reuse=True)
        targets = batch[self.target_key].to(states.device)
        model = self.encoder
        inputs, _, steps = decoder_io(targets, model.sos, model.eos, batch.get("target_lengths"))
        logits, hidden = model.decode_teacher_forced(states, mask, inputs)
        hidden = hidden.masked_fill(~steps.unsqueeze(-1), 0.0)
        return Features(pooled=masked_mean(hidden, steps), tokens=hidden, mask=steps, logits=logits)


@ADAPTERS.register("audio_context")
class AudioContextAdapter(ContextAdapter):
    modality = "audio_context"


@ADAPTERS.register("video_context")
class VideoContextAdapter(ContextAdapter):
    modality = "video_context"

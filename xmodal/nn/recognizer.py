"""Building blocks shared by speech recognisers and lip readers: temporal encoders, CTC head, attention decoder.

A `SequenceRecognizer` is a front end (fbank subsampling or a visual front end) followed by a temporal encoder
(Transformer, or torchaudio's Conformer), a CTC head and a small Transformer attention decoder. Its
`forward(x, mask)` returns `EncoderOutput(states [B, T, D], mask [B, T], ctc_logits [B, T, V])`, the
interface the speech adapters read; `decode_teacher_forced` runs the decoder for the hybrid loss and for
LIBS context features. Padding is exact: in eval mode a sample's outputs do not depend on the batch it is in.

Model files written by `save_recognizer` hold `{"kind", "config", "model"}` and load with `load_recognizer`.
`ctc_transcribe` turns CTC logits into greedy transcripts with a confidence, for recognisers that label data.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from xmodal.errors import CheckpointError, ConfigError
from xmodal.registry import Registry


class EncoderOutput(NamedTuple):
    """What a sequence encoder returns: states [B, T, D], bool mask [B, T], CTC logits [B, T, V]."""

    states: Tensor
    mask: Tensor
    ctc_logits: Tensor


def _safe_padding_mask(mask: Tensor) -> Tensor:
    """key_padding_mask (True = pad) that never masks a whole row (that would give NaN attention)."""
    pad = ~mask
    empty = pad.all(1)
    if bool(empty.any()):
        pad = pad.clone()
        pad[empty, 0] = False
    return pad


class SinusoidalPositionalEncoding(nn.Module):
    """Adds fixed sine/cosine position codes (Vaswani et al.); any length, computed on demand."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.dropout = nn.Dropout(dropout)

    def codes(self, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / self.dim))
        pe = torch.zeros(length, self.dim, device=device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : self.dim // 2]
        return pe.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(x + self.codes(x.shape[1], x.device, x.dtype)[None])


# ---------------------------------------------------------------- temporal encoders

TEMPORAL_ENCODERS: Registry = Registry("temporal encoder")


class _TransformerStack(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_layers: int, conv_kernel: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.layers(x, src_key_padding_mask=_safe_padding_mask(mask))


class _ConformerStack(nn.Module):
    """torchaudio's Conformer with padded frames zeroed before every depthwise convolution (as in ESPnet), so
    padding cannot leak into real frames through the convolution module."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_layers: int, conv_kernel: int, dropout: float):
        super().__init__()
        from torchaudio.models import Conformer

        if conv_kernel % 2 == 0:
            raise ConfigError(f"conformer conv_kernel must be odd, got {conv_kernel}")
        self.conformer = Conformer(dim, num_heads, ffn_dim, num_layers, conv_kernel, dropout=dropout)
        self._mask: Tensor | None = None
        for layer in self.conformer.conformer_layers:
            depthwise = layer.conv_module.sequential[2]
            depthwise.register_forward_pre_hook(self._mask_hook)

    def _mask_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._mask is None:
            return None
        return (args[0] * self._mask[:, None, :].to(args[0].dtype),)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        self._mask = mask
        try:
            out, _ = self.conformer(x, mask.sum(1).clamp_min(1))
        finally:
            self._mask = None
        return out


TEMPORAL_ENCODERS.register("transformer", _TransformerStack)
TEMPORAL_ENCODERS.register("conformer", _ConformerStack)


class TemporalEncoder(nn.Module):
    """Positional codes + a Transformer or Conformer stack over [B, T, D] with a padding mask."""

    def __init__(
        self,
        kind: str = "conformer",
        dim: int = 256,
        num_heads: int = 4,
        ffn_dim: int = 1024,
        num_layers: int = 6,
        conv_kernel: int = 15,
        dropout: float = 0.1,
    ):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"encoder dim {dim} must be divisible by num_heads {num_heads}")
        self.pos = SinusoidalPositionalEncoding(dim, dropout)
        self.stack = TEMPORAL_ENCODERS.get(kind)(dim, num_heads, ffn_dim, num_layers, conv_kernel, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.stack(self.pos(x), mask)
        return x.masked_fill(~mask.unsqueeze(-1), 0.0)


# ---------------------------------------------------------------- attention decoder


class AttentionDecoder(nn.Module):
    """Small Transformer decoder: token ids [B, K] attend causally to themselves and to encoder states."""

    def __init__(self, vocab_size: int, dim: int, num_heads: int = 4, ffn_dim: int = 1024, num_layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = SinusoidalPositionalEncoding(dim, dropout)
        layer = nn.TransformerDecoderLayer(dim, num_heads, ffn_dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(dim))
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, tokens: Tensor, memory: Tensor, memory_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [B, K, V] and decoder states [B, K, D] (LIBS context vectors) for teacher-forced inputs."""
        k = tokens.shape[1]
        x = self.pos(self.embed(tokens) * math.sqrt(self.dim))
        causal = nn.Transformer.generate_square_subsequent_mask(k, device=tokens.device, dtype=x.dtype)
        h = self.layers(x, memory, tgt_mask=causal, tgt_is_causal=True,
                        memory_key_padding_mask=_safe_padding_mask(memory_mask))
        return self.out(h), h

    def next_log_probs(self, prefix: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """log p(next token | prefix) [N, V] for prefixes [N, K] (starting with <sos>)."""
        logits, _ = self(prefix, memory, memory_mask)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)


# ---------------------------------------------------------------- recogniser base


class SequenceRecognizer(nn.Module):
    """Front end → temporal encoder → CTC head, plus an attention decoder. Subclasses define `frontend`."""

    kind: str = ""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        c = config
        self.width = c.dim
        self.vocab_size, self.blank, self.sos, self.eos = c.vocab_size, c.blank, c.sos, c.eos
        self.encoder = TemporalEncoder(c.encoder, c.dim, c.num_heads, c.ffn_dim, c.num_layers, c.conv_kernel,
                                       c.dropout)
        self.ctc_head = nn.Linear(c.dim, c.vocab_size)
        self.decoder = AttentionDecoder(c.vocab_size, c.dim, c.num_heads, c.decoder_ffn_dim, c.decoder_layers,
                                        c.dropout)

    def frontend(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Raw input + mask → per-step features [B, T', D] and mask [B, T']."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        feats, mask = self.frontend(x, mask)
        states = self.encoder(feats, mask)
        return EncoderOutput(states, mask, self.ctc_head(states))

    def decode_teacher_forced(self, states: Tensor, mask: Tensor, tokens_in: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder logits [B, K, V] and states [B, K, D] for inputs `<sos> y` (see `seqalign.decoder_io`)."""
        return self.decoder(tokens_in, states, mask)


# ---------------------------------------------------------------- greedy CTC transcripts


@dataclass
class CTCTranscript:
    """A greedy CTC transcript (the fields `xmodal.data.pseudo.ConfidenceFilter` reads, like Whisper's).

    `avg_logprob` is the mean, over the best path's emitting frames (frames whose argmax is not the blank),
    of the log-probability of that argmax; see `ctc_confidence`. CTC decoding always ends: `finished` is True.
    """

    text: str
    avg_logprob: float
    tokens: list[int]
    finished: bool = True
    frames: int = field(default=0, compare=False)  # real input frames of the utterance

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)


def compression_ratio(text: str) -> float:
    """Bytes of text over bytes zlib makes of it (Whisper's measure: high for the repetition loops decoders fall
    into); 0 for an empty text."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def ctc_confidence(logits: Tensor, mask: Tensor | None = None, blank: int = 0) -> tuple[list[list[int]], Tensor]:
    """Greedy (best-path) CTC labels per utterance and their confidence [B] from logits [B, T, V].

    Confidence: the mean of max_v log p_t(v) over the emitting frames t (argmax ≠ blank, repeats of a token
    included). Blank frames are left out: they are nearly always certain and would hide an unsure character in a
    long silence. An utterance with no emitting frame (an empty transcript) gets the mean over all its frames.
    """
    from xmodal.seqalign import IGNORE_ID, ctc_collapse

    if logits.dim() != 3:
        raise ValueError(f"CTC logits must be [B, T, V], got {list(logits.shape)}")
    if mask is None:
        mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    best, labels = torch.log_softmax(logits.float(), dim=-1).max(-1)  # [B, T] each
    emitting = mask & (labels != blank)
    use = torch.where(emitting.any(1, keepdim=True), emitting, mask).to(best.dtype)
    confidence = (best * use).sum(1) / use.sum(1).clamp_min(1.0)
    return ctc_collapse(labels.masked_fill(~mask, IGNORE_ID), blank), confidence


def ctc_transcribe(out: EncoderOutput, decode: Callable[[Iterable[int]], str], blank: int = 0) -> list[CTCTranscript]:
    """Greedy CTC transcripts of an encoder output with CTC logits; `decode` maps token ids to text
    (a vocabulary's `decode`)."""
    if out.ctc_logits is None:
        raise ValueError("the model has no CTC head (its output carries no CTC logits), so it cannot transcribe")
    tokens, confidence = ctc_confidence(out.ctc_logits, out.mask, blank)
    frames = out.mask.sum(1).tolist()
    return [CTCTranscript(decode(ids), float(c), ids, True, int(n))
            for ids, c, n in zip(tokens, confidence.tolist(), frames)]


# ---------------------------------------------------------------- model files

RECOGNIZERS: Registry = Registry("recognizer")


def register_recognizer(kind: str, config_cls: type):
    """Class decorator: register a SequenceRecognizer under `kind` with its config dataclass."""

    def deco(cls):
        cls.kind = kind
        cls.config_cls = config_cls
        RECOGNIZERS.register(kind, cls)
        return cls

    return deco


def build_recognizer(kind: str, config: Any = None) -> SequenceRecognizer:
    """Build a registered recogniser from its config dataclass, a plain mapping, or defaults."""
    from xmodal.config import from_dict

    cls = RECOGNIZERS.get(kind)
    if config is None:
        config = cls.config_cls()
    elif not dataclasses.is_dataclass(config):
        config = from_dict(cls.config_cls, config, source=f"{kind} config")
    return cls(config)


def save_recognizer(model: SequenceRecognizer, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write {"kind", "config", "model", "meta"} atomically; `load_recognizer` rebuilds the model from it.

    `meta` is plain data kept beside the weights, e.g. {"vocab": {"chars": ...}, "video": VideoConfig dict},
    so an evaluator can preprocess inputs exactly as in training.
    """
    from xmodal.config import to_dict
    from xmodal.io import atomic_torch_save

    atomic_torch_save({"kind": model.kind, "config": to_dict(model.config), "model": model.state_dict(),
                       "meta": to_dict(meta or {})}, path)


def load_recognizer(path: str | os.PathLike, kind: str | None = None, map_location: str = "cpu", *,
                    return_meta: bool = False) -> SequenceRecognizer | tuple[SequenceRecognizer, dict]:
    """Rebuild a recogniser (in eval mode) from a file written by `save_recognizer` (weights_only loading);
    with `return_meta`, also return the file's meta dict."""
    from xmodal.weights import load_weights

    ckpt = load_weights(path, map_location=map_location, what="model file")
    if not isinstance(ckpt, dict) or not {"config", "model"} <= set(ckpt):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a model file with keys 'kind', 'config', 'model', got {keys}")
    file_kind = ckpt.get("kind") or kind
    if file_kind is None:
        raise CheckpointError(f"{path}: the file does not say which model it holds; pass kind= "
                              f"(one of {', '.join(RECOGNIZERS.names())})")
    if kind is not None and file_kind != kind:
        raise CheckpointError(f"{path} holds a '{file_kind}' model, not a '{kind}'")
    model = build_recognizer(file_kind, ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the {file_kind} config stored with them: {e}") from e
    model.eval()
    return (model, dict(ckpt.get("meta") or {})) if return_meta else model

"""Speech-recogniser teachers for lip reading: xmodal's own CTC/attention recogniser and torchaudio wav2vec2.

- `SpeechRecognizer`: convolutional subsampling (×1, ×2 or ×4 in time) of log-mel fbank features, a
  Conformer (torchaudio) or Transformer encoder, a CTC head and a small attention decoder. With 10 ms fbank
  frames and ×4 subsampling its states run at 25 Hz, the video frame rate, so `rate_stack` can align them.
  Trainable with xmodal's `ctc` + `attention_ce` losses on batch["audio"]; saved with `save_recognizer`.
- `load_wav2vec2`: torchaudio wav2vec2 / HuBERT architectures with weights from a local file (nothing is
  downloaded), wrapped as `Wav2Vec2Encoder` (waveform [B, S] + mask → states, mask, CTC logits at 50 Hz).

Both are teacher kinds of the "speech" family (`xmodal.models.create_teacher`): "speech" and "wav2vec2", loaded
from a config's `path` (and `params` for wav2vec2) with the job's vocabulary. Both can `transcribe` (greedy CTC
with a confidence, `xmodal.nn.recognizer.ctc_transcribe`), so they can pseudo-label clips (`xmodal data
pseudo-label --kind speech`); a speech recogniser file records the audio settings it was trained on.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import xmodal.adapters.speech  # noqa: F401  (registers the audio/video adapters with the teachers)
from xmodal.data.vocab import BLANK, SOS_EOS
from xmodal.device import resolve_device
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.fingerprint import model_fingerprint
from xmodal.models import config_value, register_teacher
from xmodal.nn.recognizer import (
    TEMPORAL_ENCODERS,
    CTCTranscript,
    EncoderOutput,
    SequenceRecognizer,
    ctc_transcribe,
    load_recognizer,
    register_recognizer,
)
from xmodal.registry import Registry, check_kwargs, suggest
from xmodal.seqalign import lengths_to_mask
from xmodal.weights import load_weights

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- xmodal speech recogniser


@dataclass
class SpeechRecognizerConfig:
    """Fbank → subsampling → Conformer/Transformer → CTC head + attention decoder."""

    n_mels: int = 80
    vocab_size: int = 30  # CharVocab: blank, sos/eos, space, apostrophe, a–z
    dim: int = 144
    encoder: str = "conformer"  # "conformer" or "transformer"
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 576
    conv_kernel: int = 15
    subsampling: int = 4  # 1, 2 or 4
    decoder_layers: int = 1
    decoder_ffn_dim: int = 576
    dropout: float = 0.1
    blank: int = 0
    sos: int = 1
    eos: int = 1

    def __post_init__(self) -> None:
        if self.subsampling not in (1, 2, 4):
            raise ConfigError(f"subsampling must be 1, 2 or 4, got {self.subsampling}")
        if self.encoder not in TEMPORAL_ENCODERS:
            raise ConfigError(f"unknown encoder '{self.encoder}'{suggest(self.encoder, TEMPORAL_ENCODERS.names())}; "
                              f"known: {', '.join(TEMPORAL_ENCODERS.names())}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")


class ConvSubsampling(nn.Module):
    """Stride-2 3×3 Conv2d stages over (time, mel) (ESPnet style); padded frames are zeroed before every
    stage so a sample's output does not depend on its padding. Output length ⌈T / factor⌉."""

    def __init__(self, n_mels: int, dim: int, factor: int = 4):
        super().__init__()
        stages = {1: 0, 2: 1, 4: 2}[factor]
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else dim, dim, kernel_size=3, stride=2, padding=1) for i in range(stages)
        )
        freq = n_mels
        for _ in range(stages):
            freq = (freq + 1) // 2
        self.proj = nn.Linear((dim if stages else 1) * freq, dim)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lengths = mask.sum(1)
        h = x.masked_fill(~mask[:, :, None], 0.0).unsqueeze(1)  # [B, 1, T, F]
        for conv in self.convs:
            h = F.relu(conv(h))
            lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
            mask = lengths_to_mask(lengths, h.shape[2])
            h = h * mask[:, None, :, None].to(h.dtype)
        b, c, t, f = h.shape
        return self.proj(h.permute(0, 2, 1, 3).reshape(b, t, c * f)), mask


@register_recognizer("speech_recognizer", SpeechRecognizerConfig)
class SpeechRecognizer(SequenceRecognizer):
    """CTC/attention speech recogniser over log-mel features [B, T, n_mels] with mask [B, T]."""

    input_features = "fbank"  # what it reads from batch["audio"] (AudioConfig.features)

    def __init__(self, config: SpeechRecognizerConfig | None = None):
        config = config or SpeechRecognizerConfig()
        super().__init__(config)
        self.subsample = ConvSubsampling(config.n_mels, config.dim, config.subsampling)
        # Set by `load_speech_recognizer` from the file's meta (what the lip job records when it trains one):
        self.vocab: Any = None  # the vocabulary its CTC head predicts, for `transcribe`
        self.audio_config: Any = None  # the AudioConfig (rate, mels, frames) of the features it was trained on
        self.sample_rate: int | None = None  # audio_config.sample_rate; the lip job refuses data at another rate

    def frontend(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.config.n_mels:
            raise ValueError(
                f"SpeechRecognizer expects fbank features [B, T, {self.config.n_mels}], got {list(x.shape)}"
            )
        return self.subsample(x, mask)

    @torch.inference_mode()
    def transcribe(self, features: Tensor, mask: Tensor | None = None) -> list[CTCTranscript]:
        """Greedy CTC transcripts of log-mel features [B, T, n_mels]; `avg_logprob` is the mean log-probability
        of the best path over its emitting (non-blank) frames (`xmodal.nn.recognizer.ctc_confidence`)."""
        if self.vocab is None:
            raise ConfigError("this speech recogniser does not know its vocabulary (its file has no meta 'vocab'); "
                              "load it with load_speech_recognizer(path, vocab=...) or set its .vocab")
        param = next(self.parameters())
        x = features.to(device=param.device, dtype=param.dtype)
        mask = None if mask is None else mask.to(param.device)
        return ctc_transcribe(self(x, mask), self.vocab.decode, self.blank)


def _freeze(model: nn.Module, frozen: bool) -> nn.Module:
    if frozen:
        model.eval().requires_grad_(False)
    return model


def load_speech_recognizer(path: str | os.PathLike, *, vocab: Any = None, device: str = "cpu",
                           frozen: bool = True) -> SpeechRecognizer:
    """Load an xmodal speech recogniser saved with `save_recognizer` (keys kind, config, model, meta).

    The file's meta gives its vocabulary (else `vocab`, which must then have as many tokens as its CTC head) and
    the audio settings it was trained on (`audio_config`, `sample_rate`; None when the file does not say).
    """
    from xmodal.config import from_dict
    from xmodal.data.av import AudioConfig
    from xmodal.data.vocab import vocab_from_dict

    model, meta = load_recognizer(path, kind="speech_recognizer", return_meta=True)
    try:
        if isinstance(meta.get("vocab"), Mapping):
            vocab = vocab_from_dict(dict(meta["vocab"]))
        if isinstance(meta.get("audio"), Mapping):
            model.audio_config = from_dict(AudioConfig, dict(meta["audio"]), source=f"{path} meta 'audio'")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its meta record is not valid: {e}") from e
    if vocab is not None and len(vocab) != model.vocab_size:
        raise ConfigError(f"{path}: the recogniser predicts {model.vocab_size} tokens but the vocabulary has "
                          f"{len(vocab)}; give the vocabulary it was trained with")
    if model.audio_config is not None:
        if model.audio_config.n_mels != model.config.n_mels or model.audio_config.features != "fbank":
            raise CheckpointError(f"{path}: meta 'audio' ({model.audio_config.features}, "
                                  f"{model.audio_config.n_mels} mels) does not fit the model's "
                                  f"{model.config.n_mels}-band fbank input")
        model.sample_rate = int(model.audio_config.sample_rate)
    model.vocab = vocab
    model.fingerprint = model_fingerprint(model, {"kind": "speech_recognizer"})
    return _freeze(model.to(resolve_device(device)), frozen)


@register_teacher("speech", family="speech")
def speech_teacher(cfg: Any, *, vocab: Any = None, device: str = "cpu", frozen: bool = True) -> SpeechRecognizer:
    """Teacher kind "speech": an xmodal recogniser file (`path`, written by `save_recognizer`; log-mel input)."""
    params = config_value(cfg, "params") or {}
    if params:
        raise ConfigError(f"teacher.params {sorted(params)}: a 'speech' teacher file takes no parameters")
    return load_speech_recognizer(config_value(cfg, "path"), vocab=vocab, device=device, frozen=frozen)


# ---------------------------------------------------------------- wav2vec2 / HuBERT via torchaudio

def _torchaudio_arch(name: str, **kwargs: Any) -> nn.Module:
    from torchaudio import models as ta_models

    return getattr(ta_models, name)(**kwargs)


WAV2VEC2_ARCHS: Registry = Registry("wav2vec2 architecture")  # name → factory(aux_num_out=...)
for _name in ("wav2vec2_base", "wav2vec2_large", "wav2vec2_large_lv60k", "wav2vec2_xlsr_300m", "wav2vec2_xlsr_1b",
              "wav2vec2_xlsr_2b", "hubert_base", "hubert_large", "hubert_xlarge"):
    WAV2VEC2_ARCHS.register(_name, functools.partial(_torchaudio_arch, _name))

BLANK_LABELS = ("-", "<pad>", "<blank>", "<eps>")
WORD_DELIMITERS = ("|", " ")


def wav2vec2_label_map(labels: Sequence[str], vocab_tokens: Sequence[str]) -> list[int]:
    """For each xmodal vocabulary token, the index of the same symbol in a wav2vec2 label set (-1 if absent).

    The blank (index 0 of the xmodal vocabulary) maps to "-"/"<pad>"/"<blank>", a space to the word
    delimiter "|", letters match case-insensitively.
    """
    lookup: dict[str, int] = {}
    for i, lab in enumerate(labels):
        lookup.setdefault(lab.lower(), i)
    blank = next((lookup[b] for b in BLANK_LABELS if b in lookup), -1)
    delim = next((lookup[d] for d in WORD_DELIMITERS if d in lookup), -1)
    out = []
    for i, tok in enumerate(vocab_tokens):
        if i == 0:
            out.append(blank)
        elif tok == " ":
            out.append(delim)
        else:
            out.append(lookup.get(tok.lower(), -1))
    return out


class Wav2Vec2Encoder(nn.Module):
    """torchaudio Wav2Vec2Model as a sequence encoder: waveform [B, S] + mask → EncoderOutput.

    `label_map` (from `wav2vec2_label_map`) reorders CTC logits into the student's vocabulary; symbols the
    checkpoint lacks get a logit of -1e4. `normalize_waveform` applies per-utterance zero-mean unit-variance
    normalisation over the real samples (needed by the large LV-60k and XLS-R models).
    """

    input_features = "waveform"  # what it reads from batch["audio"] (AudioConfig.features)
    blank = 0  # index of the CTC blank: "-"/"<pad>" in torchaudio's label sets, mapped to 0 by `label_map`
    sample_rate = 16000  # every wav2vec2 / HuBERT / WavLM checkpoint of torchaudio and fairseq reads 16 kHz audio

    def __init__(self, model: nn.Module, label_map: Sequence[int] | None = None, normalize_waveform: bool = False):
        super().__init__()
        self.model = model
        self.width = int(model.encoder.feature_projection.projection.out_features)
        self.normalize_waveform = normalize_waveform
        self.register_buffer("label_map", None if label_map is None else torch.tensor(list(label_map)),
                             persistent=False)
        self.vocab: Any = None  # the student's vocabulary when `label_map` maps the CTC head into it (`transcribe`)

    @property
    def min_samples(self) -> int:
        """Receptive field of the convolutional feature extractor (400 samples = 25 ms for the standard models):
        shorter audio gives no encoder frame at all."""
        field, jump = 1, 1
        for layer in self.model.feature_extractor.conv_layers:
            field += (layer.conv.kernel_size[0] - 1) * jump
            jump *= layer.conv.stride[0]
        return field

    @property
    def vocab_size(self) -> int | None:
        """Size of the CTC output: the student's vocabulary with a label map, else the head's; None without one."""
        if self.label_map is not None:
            return int(self.label_map.numel())
        return None if self.model.aux is None else int(self.model.aux.out_features)

    def forward(self, waveform: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        if waveform.dim() == 3 and waveform.shape[-1] == 1:
            waveform = waveform.squeeze(-1)
        if waveform.dim() != 2:
            raise ValueError(f"wav2vec2 expects waveforms [B, S], got {list(waveform.shape)}")
        if mask is None:
            mask = torch.ones_like(waveform, dtype=torch.bool)
        lengths = mask.sum(1)
        short = (lengths < self.min_samples).nonzero().flatten().tolist()
        if short:
            i, n, need = short[0], int(lengths[short[0]]), self.min_samples
            ms = 1e3 / self.sample_rate
            raise DataError(
                f"utterance {i} of the batch has {n} audio samples ({n * ms:.1f} ms), shorter than the wav2vec2 "
                f"teacher's receptive field of {need} samples ({need * ms:.0f} ms at {self.sample_rate} Hz), so it "
                f"has no teacher frame; {len(short)} such utterance(s) in this batch: drop clips that short from "
                "the manifest"
            )
        x = waveform.masked_fill(~mask, 0.0)
        if self.normalize_waveform:
            m = mask.to(x.dtype)
            n = m.sum(1, keepdim=True).clamp_min(1.0)
            mean = (x * m).sum(1, keepdim=True) / n
            var = ((x - mean).pow(2) * m).sum(1, keepdim=True) / n
            x = ((x - mean) / (var + 1e-7).sqrt()) * m
        feats, out_len = self.model.feature_extractor(x, lengths)
        states = self.model.encoder(feats, out_len)
        out_mask = lengths_to_mask(out_len, states.shape[1])
        logits = self.model.aux(states) if self.model.aux is not None else None
        if logits is not None and self.label_map is not None:
            idx = self.label_map.to(logits.device)
            logits = logits[..., idx.clamp_min(0)].masked_fill(idx < 0, -1e4)
        states = states.masked_fill(~out_mask.unsqueeze(-1), 0.0)
        return EncoderOutput(states, out_mask, logits)

    @torch.inference_mode()
    def transcribe(self, waveform: Tensor, mask: Tensor | None = None) -> list[CTCTranscript]:
        """Greedy CTC transcripts in the student's vocabulary (needs a CTC head and a label map), with the same
        confidence as the speech recogniser's (`xmodal.nn.recognizer.ctc_confidence`)."""
        if self.model.aux is None or self.label_map is None or self.vocab is None:
            raise ConfigError("this wav2vec2 model cannot transcribe into the vocabulary: it needs a CTC head and "
                              "teacher.params.labels (the checkpoint's symbols), loaded with a vocabulary")
        param = next(self.parameters())
        mask = None if mask is None else mask.to(param.device)
        return ctc_transcribe(self(waveform.to(device=param.device, dtype=param.dtype), mask), self.vocab.decode,
                              self.blank)


def _read_weights(path: str | os.PathLike) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"wav2vec2 weights file not found: {path} (give a local file; nothing is downloaded)")
    return load_weights(path, what="wav2vec2 weights file")


def _state_dict_of(obj: Any, path: Any) -> dict[str, Tensor]:
    sd = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict (or a mapping with a 'model' state dict)")
    if sd and all(k.startswith("model.") for k in sd):  # torchaudio pipeline wrappers prefix "model."
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return dict(sd)


def save_wav2vec2(model: nn.Module, path: str | os.PathLike, config: Mapping[str, Any],
                  labels: Sequence[str] | None = None) -> None:
    """Write {"kind": "wav2vec2", "config": wav2vec2_model kwargs, "model": state dict, "labels"} atomically."""
    from xmodal.io import atomic_torch_save

    inner = model.model if isinstance(model, Wav2Vec2Encoder) else model
    atomic_torch_save({"kind": "wav2vec2", "config": dict(config), "model": inner.state_dict(),
                       "labels": list(labels) if labels is not None else None}, path)


def load_wav2vec2(
    source: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    num_labels: int | None = None,
    labels: Sequence[str] | None = None,
    vocab_tokens: Sequence[str] | None = None,
    normalize_waveform: bool = False,
    device: str = "cpu",
    frozen: bool = True,
) -> Wav2Vec2Encoder:
    """Build a torchaudio wav2vec2/HuBERT model with local weights.

    `source` is either a file written by `save_wav2vec2` (architecture kwargs + weights + labels), or an
    architecture name ("wav2vec2_base", "hubert_large", ...) with `checkpoint` a local state-dict file (e.g.
    `bundle.get_model().state_dict()` saved on a machine with internet). The CTC head size comes from the
    weights (`aux.weight`) unless `num_labels` is given. With `labels` (the checkpoint's symbols) and
    `vocab_tokens` (the student's vocabulary tokens) the CTC logits are reordered into the student's vocabulary.
    """
    from torchaudio import models as ta_models

    src = str(source)
    if os.path.isfile(src):
        obj = _read_weights(src)
        state = _state_dict_of(obj, src)
        if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
            cfg = dict(obj["config"])
            if "aux.weight" in state:
                cfg["aux_num_out"] = int(state["aux.weight"].shape[0])
            try:
                model = ta_models.wav2vec2_model(**cfg)
            except TypeError as e:
                raise CheckpointError(f"{src}: its 'config' is not valid wav2vec2_model arguments: {e}") from e
        elif isinstance(obj, Mapping) and isinstance(obj.get("arch"), str):
            model = _build_arch(obj["arch"], state, num_labels)
        else:
            raise CheckpointError(
                f"{src}: a bare state dict does not say its architecture; pass the architecture name as source "
                f"and this file as checkpoint= (architectures: {', '.join(WAV2VEC2_ARCHS.names())})"
            )
        if labels is None and isinstance(obj, Mapping) and obj.get("labels"):
            labels = list(obj["labels"])
        where = src
    else:
        if src not in WAV2VEC2_ARCHS:
            looks_like_path = os.sep in src or src.endswith((".pt", ".pth", ".bin"))
            if looks_like_path:
                raise CheckpointError(f"wav2vec2 weights file not found: {src}")
            raise ConfigError(f"unknown wav2vec2 architecture '{src}'{suggest(src, WAV2VEC2_ARCHS.names())}; "
                              f"known: {', '.join(WAV2VEC2_ARCHS.names())}, or give a local model file")
        if checkpoint is None:
            raise ConfigError(f"wav2vec2 architecture '{src}' needs checkpoint= (a local state-dict file); "
                              "randomly initialised weights cannot teach")
        state = _state_dict_of(_read_weights(checkpoint), checkpoint)
        model = _build_arch(src, state, num_labels)
        where = str(checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not fit the wav2vec2 architecture: {e}") from e
    label_map = None
    if labels is not None and vocab_tokens is not None:
        label_map = wav2vec2_label_map(labels, vocab_tokens)
        missing = [t for t, i in zip(vocab_tokens, label_map) if i < 0 and t not in (BLANK, SOS_EOS)]
        if missing:
            log.warning("wav2vec2 labels lack %s; their logits are set to -1e4", missing)
    enc = Wav2Vec2Encoder(model, label_map, normalize_waveform).to(resolve_device(device))
    enc.fingerprint = model_fingerprint(model, {"kind": "wav2vec2", "label_map": label_map,
                                                "normalize_waveform": normalize_waveform})
    return _freeze(enc, frozen)


def _build_arch(arch: str, state: Mapping[str, Tensor], num_labels: int | None) -> nn.Module:
    if arch not in WAV2VEC2_ARCHS:
        raise ConfigError(f"unknown wav2vec2 architecture '{arch}'{suggest(arch, WAV2VEC2_ARCHS.names())}")
    if num_labels is None and "aux.weight" in state:
        num_labels = int(state["aux.weight"].shape[0])
    return WAV2VEC2_ARCHS.get(arch)(aux_num_out=num_labels)


@register_teacher("wav2vec2", family="speech")
def wav2vec2_teacher(cfg: Any, *, vocab: Any = None, device: str = "cpu", frozen: bool = True) -> Wav2Vec2Encoder:
    """Teacher kind "wav2vec2": torchaudio wav2vec2/HuBERT from a local `path` (file or architecture name) and
    `params` (checkpoint, labels, normalize_waveform, ...); CTC logits reordered into the job's vocabulary."""
    params = dict(config_value(cfg, "params") or {})
    reserved = {"source", "vocab_tokens", "device", "frozen"} & set(params)
    if reserved:
        raise ConfigError(f"teacher.params: {sorted(reserved)} are set by the job; remove them")
    check_kwargs(load_wav2vec2, params, "teacher.params (kind wav2vec2)")
    tokens = None if vocab is None else list(vocab.tokens)
    enc = load_wav2vec2(config_value(cfg, "path"), vocab_tokens=tokens, device=device, frozen=frozen, **params)
    if enc.label_map is not None:
        enc.vocab = vocab
    return enc

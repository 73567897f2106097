"""Whisper (through `transformers`, from a local folder) as a lip-reading teacher.

- Its encoder states are the LIBS alignment targets: `WhisperTeacher(waveform [B, S], mask)` returns
  `EncoderOutput(states [B, T, D], mask [B, T], None)` at 50 Hz (20 ms per state), only the real part of Whisper's
  fixed window, so the existing aligners (`rate_stack` with ratio 2, `time`, `attention`) map them to 25 fps video.
- Its transcripts are pseudo-labels for unlabelled clips: `transcribe` decodes greedily and reports each
  transcript's average log-probability (over its tokens and the end of text, as Whisper's own decoding does) and
  compression ratio, for `xmodal.data.pseudo.ConfidenceFilter`.

The folder is what `save_pretrained` writes: config.json, the weights (model.safetensors or pytorch_model.bin,
sharded or not), preprocessor_config.json and the tokenizer files; nothing is downloaded. Teacher kind "whisper"
of the "speech" family: `teacher: {kind: whisper, path: FOLDER, params: {language: en}}`, with
`data.audio.features: waveform` at the folder's sampling rate (16 kHz for Whisper).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.data.vocab import SPEECH_EXTRA
from xmodal.device import resolve_device
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.fingerprint import model_fingerprint
from xmodal.models import config_value, register_teacher
from xmodal.nn.recognizer import EncoderOutput, compression_ratio
from xmodal.registry import check_kwargs
from xmodal.seqalign import lengths_to_mask

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"the Whisper teacher needs the transformers package: {SPEECH_EXTRA}") from e
    return transformers


@dataclass
class Transcript:
    """One decoded utterance: text, mean log-probability of its tokens and end of text, and whether it ended."""

    text: str
    avg_logprob: float
    tokens: list[int]
    finished: bool

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)


class WhisperTeacher(nn.Module):
    """A transformers WhisperForConditionalGeneration with its feature extractor and tokenizer."""

    input_features = "waveform"  # what it reads from batch["audio"] (AudioConfig.features)
    vocab_size = None  # no CTC head over the student's vocabulary: distil its states, use its transcripts as text

    def __init__(self, model: nn.Module, feature_extractor: Any, tokenizer: Any, *, language: str | None = "en",
                 task: str = "transcribe", max_new_tokens: int = 128):
        super().__init__()
        self.model = model
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.width = int(model.config.d_model)
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.hop_length = int(feature_extractor.hop_length)
        self.window_samples = int(feature_extractor.n_samples)
        stride = 2  # Whisper's second convolution halves the mel frame rate
        self.samples_per_state = self.hop_length * stride
        self.frame_rate = self.sample_rate / self.samples_per_state  # 50 Hz for Whisper
        self.language, self.task = language, task
        self.prompt = self._prompt(language, task)
        self.eot = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        gen = getattr(model, "generation_config", None)
        size = int(model.config.vocab_size)  # configs may list ids of the full-size vocabulary

        def ids(name: str) -> set[int]:
            return {int(t) for t in (getattr(gen, name, None) or []) if 0 <= int(t) < size}

        self.suppress = sorted(ids("suppress_tokens"))
        self.begin_suppress = sorted(ids("begin_suppress_tokens") | {self.eot})
        no_ts = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
        self.first_timestamp = int(no_ts) + 1 if isinstance(no_ts, int) and no_ts != tokenizer.unk_token_id else None
        limit = int(model.config.max_target_positions) - len(self.prompt)
        self.max_new_tokens = max(1, min(int(max_new_tokens), limit))

    def _prompt(self, language: str | None, task: str) -> list[int]:
        """<|startoftranscript|> [<|lang|>] [<|task|>] <|notimestamps|>, the tokens this tokenizer has."""
        tok = self.tokenizer
        names = ["<|startoftranscript|>"]
        if language:
            names.append(f"<|{language}|>")
        names += [f"<|{task}|>", "<|notimestamps|>"]
        unk = tok.unk_token_id
        ids = [tok.convert_tokens_to_ids(n) for n in names]
        if ids[0] in (None, unk):
            raise CheckpointError("the Whisper tokenizer has no <|startoftranscript|> token")
        if language and ids[1] in (None, unk):
            raise ConfigError(f"teacher.params.language {language!r}: this Whisper tokenizer has no <|{language}|> "
                              "token (English-only models take language: null)")
        return [int(i) for n, i in zip(names, ids) if i not in (None, unk) or n == names[0]]

    # ------------------------------------------------------------------------------------------ encoder

    def _inputs(self, waveform: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Log-mel features [B, n_mels, frames] of Whisper's window and the real encoder lengths [B]."""
        if waveform.dim() == 3 and waveform.shape[-1] == 1:
            waveform = waveform.squeeze(-1)
        if waveform.dim() != 2:
            raise ValueError(f"Whisper expects waveforms [B, S], got {list(waveform.shape)}")
        if mask is None:
            mask = torch.ones_like(waveform, dtype=torch.bool)
        lengths = mask.sum(1).tolist()
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.window_samples]
        if too_long:
            i, n = too_long[0]
            raise DataError(f"utterance {i} of the batch is {n / self.sample_rate:.1f} s, longer than Whisper's "
                            f"{self.window_samples / self.sample_rate:.0f} s window; cut the clips into shorter "
                            "segments")
        audio = [waveform[i, : int(n)].detach().float().cpu().numpy() for i, n in enumerate(lengths)]
        feats = self.feature_extractor(audio, sampling_rate=self.sample_rate, return_tensors="pt").input_features
        param = next(self.model.parameters())
        states = torch.tensor([math.ceil(n / self.samples_per_state) for n in lengths], dtype=torch.long)
        return feats.to(device=param.device, dtype=param.dtype), states.to(param.device)

    def encode(self, waveform: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encoder states over the whole window [B, T_window, D] and the real lengths [B]."""
        feats, lengths = self._inputs(waveform, mask)
        states = self.model.model.encoder(feats).last_hidden_state
        return states, lengths.clamp_max(states.shape[1])

    def forward(self, waveform: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        states, lengths = self.encode(waveform, mask)
        t = max(int(lengths.max()), 1) if lengths.numel() else 1
        out_mask = lengths_to_mask(lengths, t)
        states = states[:, :t].masked_fill(~out_mask.unsqueeze(-1), 0.0)
        return EncoderOutput(states, out_mask, None)

    # ------------------------------------------------------------------------------------------ decoder

    @torch.inference_mode()
    def transcribe(self, waveform: Tensor, mask: Tensor | None = None) -> list[Transcript]:
        """Greedy transcripts of a batch, with their average log-probabilities."""
        from transformers.modeling_outputs import BaseModelOutput

        states, _ = self.encode(waveform, mask)
        b, device = states.shape[0], states.device
        enc = BaseModelOutput(last_hidden_state=states)
        inputs = torch.tensor([self.prompt] * b, device=device)
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        past = None
        done = torch.zeros(b, dtype=torch.bool, device=device)
        total = torch.zeros(b, dtype=torch.float64, device=device)
        count = torch.zeros(b, dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        for step in range(self.max_new_tokens):
            out = self.model(encoder_outputs=enc, decoder_input_ids=inputs, use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)  # transformers renamed past_key_values to cache
            logits = out.logits[:, -1].float()
            blocked = self.suppress + (self.begin_suppress if step == 0 else [])
            if blocked:
                logits[:, blocked] = -math.inf
            if self.first_timestamp is not None and self.first_timestamp < logits.shape[1]:
                logits[:, self.first_timestamp:] = -math.inf
            logp = torch.log_softmax(logits, dim=-1)
            nxt = logp.argmax(-1)
            live = ~done
            total += torch.where(live, logp.gather(1, nxt[:, None])[:, 0].double(), 0.0)
            count += live.long()
            for i in torch.nonzero(live & (nxt != self.eot)).flatten().tolist():
                tokens[i].append(int(nxt[i]))
            done |= nxt == self.eot
            if bool(done.all()):
                break
            inputs = torch.where(done, torch.full_like(nxt, self.eot), nxt)[:, None]
        return [Transcript(self.tokenizer.decode(tokens[i], skip_special_tokens=True).strip(),
                           float(total[i] / count[i].clamp_min(1)), tokens[i], bool(done[i])) for i in range(b)]


def _check_folder(path: Path) -> None:
    where = f"Whisper folder {path}"
    if not path.is_dir():
        raise CheckpointError(f"{where} does not exist (give a local folder written by save_pretrained; nothing is "
                              "downloaded)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{where} has no config.json; it is not a saved transformers model")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{where} has no weights (looked for {', '.join(WEIGHT_FILES)}); copy the model's "
                              "weight files next to its config.json")
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{where} has no preprocessor_config.json (the feature extractor's settings); save "
                              "the WhisperProcessor or WhisperFeatureExtractor into it")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise CheckpointError(f"{where} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); save the "
                              "WhisperTokenizer into it")


def load_whisper(path: str | os.PathLike, *, language: str | None = "en", task: str = "transcribe",
                 max_new_tokens: int = 128, device: str = "cpu", frozen: bool = True) -> WhisperTeacher:
    """A Whisper teacher from a local transformers folder (weights, feature extractor and tokenizer)."""
    tf = _transformers()
    path = Path(path)
    _check_folder(path)
    if task not in ("transcribe", "translate"):
        raise ConfigError(f"teacher.params.task must be 'transcribe' or 'translate', got {task!r}")
    try:
        model = tf.WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True)
        extractor = tf.WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
        tokenizer = tf.WhisperTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"Whisper folder {path}: cannot load it: {e}") from e
    teacher = WhisperTeacher(model, extractor, tokenizer, language=language, task=task,
                             max_new_tokens=max_new_tokens).to(resolve_device(device))
    if frozen:
        teacher.eval().requires_grad_(False)
    teacher.fingerprint = model_fingerprint(model, {"kind": "whisper", "language": language, "task": task,
                                                    "max_new_tokens": teacher.max_new_tokens,
                                                    "features": extractor.to_dict(), "prompt": teacher.prompt})
    return teacher


@register_teacher("whisper", family="speech")
def whisper_teacher(cfg: Any, *, vocab: Any = None, device: str = "cpu", frozen: bool = True) -> WhisperTeacher:
    """Teacher kind "whisper": a transformers Whisper folder (`path`) with `params` language, task, max_new_tokens."""
    params = dict(config_value(cfg, "params") or {})
    reserved = {"path", "device", "frozen"} & set(params)
    if reserved:
        raise ConfigError(f"teacher.params: {sorted(reserved)} are set by the job; remove them")
    check_kwargs(load_whisper, params, "teacher.params (kind whisper)")
    return load_whisper(config_value(cfg, "path"), device=device, frozen=frozen, **params)


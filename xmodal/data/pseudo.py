"""Pseudo-labels: a speech teacher's transcripts of unlabelled clips, kept only when the teacher was confident.

`ConfidenceFilter` accepts a transcript when it ended (end of text), its average log-probability is at least
`min_avg_logprob`, it is not a repetition loop (zlib compression ratio at most `max_compression_ratio`) and the
student's vocabulary can spell it; every rejection is counted by reason and the acceptance rate is logged.
`pseudo_label_manifest` writes a copy of a manifest with accepted transcripts filled in (marked `pseudo_label`),
once per recipe: a sidecar `<out>.json` records the teacher, the input and the filter, and a matching one means
the labels are reused. The teacher gets what it reads: the waveform (Whisper, wav2vec2) or the lip job's log-mel
features (`audio=AudioConfig(features="fbank", ...)`, for xmodal speech recognisers), computed as in training.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from xmodal.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class TranscriptLike(Protocol):
    text: str
    avg_logprob: float
    finished: bool

    @property
    def compression_ratio(self) -> float: ...


@dataclass
class ConfidenceFilter:
    """Accept or reject teacher transcripts; `counts` holds "accepted" and each rejection reason."""

    min_avg_logprob: float = -1.0
    max_compression_ratio: float | None = 2.4
    counts: Counter = field(default_factory=Counter, compare=False)

    def __post_init__(self) -> None:
        if self.max_compression_ratio is not None and self.max_compression_ratio <= 0:
            raise ConfigError(f"max_compression_ratio must be positive, got {self.max_compression_ratio}")

    def reason(self, t: TranscriptLike, vocab: Any = None) -> str | None:
        """Why `t` is rejected, or None when it is accepted."""
        text = vocab.normalize(t.text) if vocab is not None else t.text.strip()
        if not t.finished:
            return "unfinished"
        if not text:
            return "empty"
        if t.avg_logprob < self.min_avg_logprob:
            return "low confidence"
        if self.max_compression_ratio is not None and t.compression_ratio > self.max_compression_ratio:
            return "repetitive"
        if vocab is not None:
            try:
                vocab.encode(text)
            except DataError:
                return "outside vocabulary"
        return None

    def accept(self, t: TranscriptLike, vocab: Any = None) -> bool:
        why = self.reason(t, vocab)
        self.counts[why or "accepted"] += 1
        return why is None

    def skip(self, reason: str) -> None:
        """Count a clip that never reached the teacher (e.g. no audio)."""
        self.counts[reason] += 1

    @property
    def seen(self) -> int:
        return sum(self.counts.values())

    @property
    def acceptance_rate(self) -> float | None:
        return self.counts["accepted"] / self.seen if self.seen else None

    def summary(self) -> str:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if k != "accepted") or "none"
        rate = self.acceptance_rate
        shown = f"{rate:.1%}" if rate is not None else "n/a"
        return f"accepted {self.counts['accepted']}/{self.seen} ({shown}); rejected: {rejected}"


Transcriber = Callable[[torch.Tensor, torch.Tensor], Sequence[TranscriptLike]]


def teacher_audio(sample_rate: int | None = None, audio: Any = None) -> Any:
    """The AudioConfig a transcriber reads: `audio` as given, else the waveform at `sample_rate`."""
    from xmodal.data.av import AudioConfig

    if audio is None:
        if sample_rate is None:
            raise ConfigError("pseudo-labels need the teacher's input: give sample_rate= (waveform teachers) or "
                              "audio= (an AudioConfig, e.g. log-mel features for a speech recogniser)")
        return AudioConfig(sample_rate=int(sample_rate), features="waveform")
    if sample_rate is not None and int(sample_rate) != audio.sample_rate:
        raise ConfigError(f"sample_rate {sample_rate} differs from audio.sample_rate {audio.sample_rate}; give one")
    return audio


def pseudo_label_manifest(manifest: str | Path, out: str | Path, transcribe: Transcriber, *,
                          sample_rate: int | None = None, audio: Any = None, teacher: str,
                          filt: ConfidenceFilter | None = None, vocab: Any = None, batch_size: int = 8,
                          relabel: bool = False, progress: bool = False) -> dict:
    """Write `out`: `manifest` with the teacher's accepted transcripts for its unlabelled clips (all clips with
    `relabel`), each marked {"pseudo_label": {"teacher", "avg_logprob"}}. The teacher reads each clip's waveform at
    `sample_rate`, or with `audio` (an `xmodal.data.av.AudioConfig`) the features it names, made by the lip job's
    own extractor. Returns the sidecar record (counts, acceptance rate, recipe); when `<out>.json` already holds
    the same recipe, nothing is recomputed."""
    from xmodal.config import to_dict
    from xmodal.data.av import AUDIO_FEATURES, _pad, load_audio, read_av_manifest
    from xmodal.io import atomic_write, atomic_write_json
    from xmodal.progress import progress as progress_bar

    manifest, out = Path(manifest), Path(out)
    if out.resolve() == manifest.resolve():
        raise ConfigError(f"the pseudo-labelled manifest must be a new file, not the input {manifest}")
    audio = teacher_audio(sample_rate, audio)
    extract = AUDIO_FEATURES[audio.features]
    filt = filt or ConfidenceFilter()
    records = read_av_manifest(manifest)  # a missing or malformed manifest is a DataError before anything runs
    recipe = {"teacher": teacher, "manifest": hashlib.sha256(manifest.read_bytes()).hexdigest(), "relabel": relabel,
              "min_avg_logprob": filt.min_avg_logprob, "max_compression_ratio": filt.max_compression_ratio,
              "vocab": None if vocab is None else vocab.to_dict(), "sample_rate": audio.sample_rate,
              "audio": to_dict(audio)}
    sidecar = out.with_name(out.name + ".json")
    if out.is_file() and sidecar.is_file():
        try:
            previous = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and previous.get("recipe") == recipe:
            log.info("pseudo-labels: %s is up to date (%s)", out, previous.get("summary"))
            return {**previous, "reused": True}
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    todo = [i for i, r in enumerate(records) if relabel or not (r.transcript or "").strip()]
    with_audio = []
    for i in todo:
        if records[i].audio is None:
            filt.skip("no audio")
        else:
            with_audio.append(i)
    batches = [with_audio[k:k + batch_size] for k in range(0, len(with_audio), batch_size)]
    for batch in progress_bar(batches, desc="pseudo-labels", unit="batch", enabled=progress):
        ids = [records[i].id for i in batch]
        inputs = [extract(load_audio(records[i].audio, audio.sample_rate, records[i].id,
                                     max_expansion=audio.max_expansion), audio, records[i].id) for i in batch]
        x, mask = _pad(inputs, ids, "audio")
        results = transcribe(x, mask)
        if len(results) != len(batch):
            raise ValueError(f"the transcriber returned {len(results)} transcripts for {len(batch)} clips")
        for i, t in zip(batch, results):
            if filt.accept(t, vocab):
                rows[i]["transcript"] = vocab.normalize(t.text) if vocab is not None else t.text.strip()
                rows[i]["pseudo_label"] = {"teacher": teacher, "avg_logprob": round(float(t.avg_logprob), 4)}
            elif relabel:
                rows[i].pop("transcript", None)  # a clip the teacher cannot label is unlabelled, not mislabelled
    with atomic_write(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    record = {"recipe": recipe, "counts": dict(filt.counts), "acceptance_rate": filt.acceptance_rate,
              "summary": filt.summary(), "clips": len(records), "asked": len(todo)}
    atomic_write_json(sidecar, record)
    log.info("pseudo-labels for %s: %s", manifest, filt.summary())
    return {**record, "reused": False}

"""Pseudo-labels: a speech teacher's transcripts of unlabelled clips, kept only when the teacher was confident.

`ConfidenceFilter` accepts a transcript when it ended (end of text), its average log-probability is at least
`min_avg_logprob`, it is not a repetition loop (zlib compression ratio at most `max_compression_ratio`) and the
student's vocabulary can spell it; every rejection is counted by reason and the acceptance rate is logged.
`pseudo_label_manifest` writes a copy of a manifest with accepted transcripts filled in (marked `pseudo_label`),
once per recipe: a sidecar `<out>.json` records the teacher, the input and the filter, and a matching one means
the labels are reused. The teacher gets what it reads: the waveform (Whisper, wav2vec2) or the lip job's log-mel
features (`audio=AudioConfig(features="fbank", ...)`, for xmodal speech recognisers), computed as in training.

The teacher's raw transcripts of every asked clip (before filtering) are kept in a teacher cache
(`xmodal.engine.cache`, default folder `<out>.cache/`), keyed by clip id under a fingerprint of the teacher and the
data (manifest content, audio file states, the clips asked, the teacher's input settings). Modality `transcript`:
`tokens` [len, 1] are the text's UTF-8 bytes (exact in float32), `pooled` is [avg_logprob, finished,
compression_ratio] (float32). So another threshold or vocabulary filters again without the teacher, an interrupted
run resumes at the first unfinished shard, and a cache of another teacher or of changed data is refused, naming
what differs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.features import Features

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


TRANSCRIPT = "transcript"  # the cache modality that holds pseudo-label transcripts
SHARD_SIZE = 1024  # clips per cache shard: an interrupted run loses at most this many transcripts
LOWEST = float(np.finfo(np.float32).min)  # stored for a non-finite avg_logprob: no confidence at all
IDENTITY_PARTS = ("manifest = the manifest's content, media = the audio files (path, size, time), clips = the clips "
                  "asked, audio = the teacher's input settings")


@dataclass(frozen=True)
class StoredTranscript:
    """A teacher transcript as the cache keeps it: the fields `ConfidenceFilter` reads."""

    text: str
    avg_logprob: float
    finished: bool
    compression_ratio: float


def transcript_features(transcripts: Sequence[TranscriptLike]) -> Features:
    """Transcripts as cache Features: tokens [B, T, 1] the UTF-8 bytes of each text (mask: real bytes), pooled
    [B, 3] (avg_logprob, finished, compression_ratio); a non-finite avg_logprob is stored as the lowest float32."""
    raw = [t.text.encode("utf-8", "surrogatepass") for t in transcripts]
    longest = max((len(b) for b in raw), default=0)
    tokens = torch.zeros(len(raw), longest, 1)
    mask = torch.zeros(len(raw), longest, dtype=torch.bool)
    for i, b in enumerate(raw):
        tokens[i, : len(b), 0] = torch.tensor(list(b), dtype=torch.float32)
        mask[i, : len(b)] = True
    pooled = torch.tensor([[float(t.avg_logprob), float(bool(t.finished)), float(t.compression_ratio)]
                           for t in transcripts], dtype=torch.float64).reshape(-1, 3)
    pooled = torch.nan_to_num(pooled, nan=LOWEST, neginf=LOWEST, posinf=-LOWEST).clamp(LOWEST, -LOWEST)
    return Features(pooled=pooled.float(), tokens=tokens, mask=mask)


def transcripts_from_features(f: Features) -> list[StoredTranscript]:
    """The transcripts `transcript_features` stored. The compression ratio is recomputed from the exact text when
    it agrees with the stored float32 value (so thresholds compare as on the teacher's own float)."""
    from xmodal.nn.recognizer import compression_ratio

    lengths = f.mask.sum(1).tolist() if f.tokens is not None else [0] * f.batch_size
    out = []
    for i, n in enumerate(lengths):
        raw = bytes(f.tokens[i, :n, 0].round().to(torch.uint8).tolist()) if n else b""
        text = raw.decode("utf-8", "surrogatepass")
        logprob, finished, ratio = f.pooled[i].tolist()
        exact = compression_ratio(text)
        out.append(StoredTranscript(text, logprob, finished > 0.5,
                                    exact if np.float32(exact) == np.float32(ratio) else ratio))
    return out


class _ClipInputs(torch.utils.data.Dataset):
    """The teacher's input (waveform or features, as `audio` says) of each asked clip, keyed by its manifest id."""

    def __init__(self, records: Sequence[Any], audio: Any):
        from xmodal.data.av import AUDIO_FEATURES

        self.records, self.audio, self.extract = list(records), audio, AUDIO_FEATURES[audio.features]

    def __len__(self) -> int:
        return len(self.records)

    def sample_key(self, index: int) -> str:
        return self.records[index].id

    def __getitem__(self, index: int) -> dict:
        from xmodal.data.av import load_audio

        r, audio = self.records[index], self.audio
        wave = load_audio(r.audio, audio.sample_rate, r.id, max_expansion=audio.max_expansion)
        return {"id": r.id, "audio": self.extract(wave, audio, r.id)}


def _collate_clips(items: Sequence[dict]) -> dict:
    from xmodal.data.av import _pad

    ids = [item["id"] for item in items]
    x, mask = _pad([item["audio"] for item in items], ids, "audio")
    return {"ids": ids, "audio": x, "audio_mask": mask}


class _TranscribingTeacher:
    """A transcriber as a cache teacher: a batch of clips → {"transcript": Features}; counts the clips it ran on."""

    def __init__(self, transcribe: Transcriber):
        self.transcribe, self.clips = transcribe, 0

    def __call__(self, batch: dict) -> dict[str, Features]:
        results = self.transcribe(batch["audio"], batch["audio_mask"])
        if len(results) != len(batch["ids"]):
            raise ValueError(f"the transcriber returned {len(results)} transcripts for {len(batch['ids'])} clips")
        self.clips += len(results)
        return {TRANSCRIPT: transcript_features(results)}


def transcript_identity(manifest: Path, clips: Sequence[Any], audio: Any) -> Any:
    """The data identity of a transcript cache: the manifest's content, the asked clips' audio file states and
    ids, and the teacher's input settings (not the filter: re-filtering reuses the cache)."""
    from xmodal.config import to_dict
    from xmodal.fingerprint import data_identity

    return data_identity({"manifest": manifest}, media=[r.audio for r in clips], clips=[r.id for r in clips],
                         audio=to_dict(audio))


def cached_transcripts(cache: str | Path, ids: Sequence[str], *, fingerprint: str | None = None,
                       data: Any = None, chunk: int = 4096) -> dict[str, StoredTranscript]:
    """The stored transcripts of `ids` from a finished transcript cache (refused when the fingerprint or data
    identity given does not fit it, or its files changed)."""
    from xmodal.engine.cache import TeacherCache

    store = TeacherCache(cache, fingerprint=fingerprint, data=data)
    if TRANSCRIPT not in store.modalities:
        raise CheckpointError(f"{cache} is a teacher cache without pseudo-label transcripts (it holds "
                              f"{', '.join(store.modalities) or 'nothing'}); pass another cache folder")
    out: dict[str, StoredTranscript] = {}
    for k in range(0, len(ids), chunk):
        part = list(ids[k:k + chunk])
        out.update(zip(part, transcripts_from_features(store.lookup(part)[TRANSCRIPT])))
    return out


def pseudo_label_manifest(manifest: str | Path, out: str | Path, transcribe: Transcriber, *,
                          sample_rate: int | None = None, audio: Any = None, teacher: str,
                          filt: ConfidenceFilter | None = None, vocab: Any = None, batch_size: int = 8,
                          relabel: bool = False, progress: bool = False, cache: str | Path | None = None,
                          shard_size: int = SHARD_SIZE) -> dict:
    """Write `out`: `manifest` with the teacher's accepted transcripts for its unlabelled clips (all clips with
    `relabel`), each marked {"pseudo_label": {"teacher", "avg_logprob"}}. The teacher reads each clip's waveform at
    `sample_rate`, or with `audio` (an `xmodal.data.av.AudioConfig`) the features it names, made by the lip job's
    own extractor. Its raw transcripts go to the transcript cache `cache` (default `<out>.cache/`; built, resumed
    or reused, `shard_size` clips per shard) and the filter reads them from there. Returns the sidecar record
    (counts, acceptance rate, recipe, cache, clips transcribed now); when `<out>.json` already holds the same
    recipe, nothing is recomputed. `teacher` names the teacher (its fingerprint)."""
    from xmodal.config import to_dict
    from xmodal.data.av import read_av_manifest
    from xmodal.engine.cache import build_cache
    from xmodal.fingerprint import fingerprint
    from xmodal.io import atomic_write, atomic_write_json

    manifest, out = Path(manifest), Path(out)
    if out.resolve() == manifest.resolve():
        raise ConfigError(f"the pseudo-labelled manifest must be a new file, not the input {manifest}")
    cache = Path(cache) if cache is not None else out.with_name(out.name + ".cache")
    audio = teacher_audio(sample_rate, audio)
    filt = filt or ConfidenceFilter()
    records = read_av_manifest(manifest)  # a missing or malformed manifest is a DataError before anything runs
    todo = [i for i, r in enumerate(records) if relabel or not (r.transcript or "").strip()]
    with_audio = [i for i in todo if records[i].audio is not None]
    clips = [records[i] for i in with_audio]
    identity = transcript_identity(manifest, clips, audio)
    fp = fingerprint(teacher, data=identity)
    # the fingerprint covers the teacher, the manifest's content, the audio files and the input settings
    recipe = {"teacher": teacher, "fingerprint": fp, "relabel": relabel, "min_avg_logprob": filt.min_avg_logprob,
              "max_compression_ratio": filt.max_compression_ratio,
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
    for i in todo:
        if records[i].audio is None:
            filt.skip("no audio")
    runner = _TranscribingTeacher(transcribe)
    transcripts: dict[str, StoredTranscript] = {}
    if clips:
        try:
            build_cache(runner, _ClipInputs(clips, audio), cache, fp, batch_size=batch_size, shard_size=shard_size,
                        dtype="float32", collate_fn=_collate_clips, device="cpu", precision="fp32",
                        meta={"kind": "pseudo-label transcripts", "manifest": str(manifest), "teacher": teacher},
                        data=identity, progress=progress)
            transcripts = cached_transcripts(cache, [r.id for r in clips], fingerprint=fp, data=identity)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (the transcript cache of {out}; data parts: {IDENTITY_PARTS}; pass another "
                                  f"cache folder with --cache, or delete {cache} to transcribe again)") from e
    for i in with_audio:
        t = transcripts[records[i].id]
        if filt.accept(t, vocab):
            rows[i]["transcript"] = vocab.normalize(t.text) if vocab is not None else t.text.strip()
            rows[i]["pseudo_label"] = {"teacher": teacher, "avg_logprob": round(float(t.avg_logprob), 4)}
        elif relabel:
            rows[i].pop("transcript", None)  # a clip the teacher cannot label is unlabelled, not mislabelled
    with atomic_write(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    record = {"recipe": recipe, "counts": dict(filt.counts), "acceptance_rate": filt.acceptance_rate,
              "summary": filt.summary(), "clips": len(records), "asked": len(todo),
              "cache": str(cache) if clips else None, "transcribed": runner.clips}
    atomic_write_json(sidecar, record)
    log.info("pseudo-labels for %s: %s (%d of %d transcripts new, cache %s)", manifest, filt.summary(),
             runner.clips, len(clips), cache if clips else "not needed")
    return {**record, "reused": False}

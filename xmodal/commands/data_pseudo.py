"""`xmodal data pseudo-label`: a speech teacher transcribes a manifest's unlabelled clips; confident transcripts
become their labels in a new manifest (see `xmodal.data.pseudo`). Teachers that can: whisper, speech (an xmodal
speech recogniser file, fed the log-mel features its file records) and wav2vec2 with a CTC head and labels.
The teacher's raw transcripts are kept in a teacher cache (--cache), so another filter reuses them and an
interrupted run resumes."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmodal.commands import register_command


def _param(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="JSON-lines manifest with audio paths")
    p.add_argument("--out", required=True, type=Path, help="manifest to write (a sidecar OUT.json keeps the counts)")
    p.add_argument("--teacher", required=True, type=Path,
                   help="teacher model (whisper: a transformers folder; speech: a recogniser file)")
    p.add_argument("--kind", default="whisper",
                   help="teacher kind that can transcribe: whisper (default), speech or wav2vec2")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="teacher parameter, e.g. language=en (repeatable)")
    p.add_argument("--min-avg-logprob", type=float, default=-1.0,
                   help="keep transcripts whose mean token log-probability is at least this (default -1.0)")
    p.add_argument("--max-compression-ratio", type=float, default=2.4,
                   help="drop repetitive transcripts above this zlib compression ratio (default 2.4)")
    p.add_argument("--vocab", default=None,
                   help="the student's vocabulary (characters or a .model file): transcripts it cannot spell are "
                        "dropped (default: the lip job's character vocabulary)")
    p.add_argument("--relabel", action="store_true", help="transcribe every clip, not only the unlabelled ones")
    p.add_argument("--cache", type=Path, default=None,
                   help="teacher cache of the raw transcripts (default: OUT.cache/ beside --out): built once, resumed "
                        "when interrupted, re-filtered without the teacher when only the thresholds or --vocab change; "
                        "refused for another teacher or changed audio/manifest (delete it to transcribe again)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per teacher batch (default 8)")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="audio rate (default: the teacher's; needed for a speech recogniser file that does not "
                        "record its audio settings)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from xmodal.data.pseudo import ConfidenceFilter, pseudo_label_manifest
    from xmodal.data.vocab import CharVocab, load_vocab
    from xmodal.errors import ConfigError
    from xmodal.models import create_teacher

    vocab = load_vocab(args.vocab) if args.vocab else CharVocab()
    teacher = create_teacher({"kind": args.kind, "path": str(args.teacher), "params": dict(args.param)},
                             family="speech", vocab=vocab, device=args.device)
    transcribe = getattr(teacher, "transcribe", None)
    if transcribe is None:
        raise ConfigError(f"teacher kind '{args.kind}' cannot transcribe; pseudo-labels need one that can "
                          "(whisper, speech or wav2vec2 with a CTC head)")
    audio = teacher_input(teacher, args)
    filt = ConfidenceFilter(args.min_avg_logprob, args.max_compression_ratio)
    record = pseudo_label_manifest(args.manifest, args.out, transcribe, audio=audio,
                                   teacher=getattr(teacher, "fingerprint", args.kind), filt=filt, vocab=vocab,
                                   batch_size=args.batch_size, relabel=args.relabel, progress=not args.no_progress,
                                   cache=args.cache)
    state = "up to date" if record["reused"] else "written"
    cached = f"; transcripts in {record['cache']} ({record['transcribed']} new)" if record.get("cache") else ""
    print(f"{args.out}: {state}; {record['asked']} of {record['clips']} clips asked: {record['summary']}{cached}")
    return 0


def teacher_input(teacher, args: argparse.Namespace):
    """The AudioConfig the teacher reads: the one it records (speech recogniser files), else its input kind
    (`input_features`, waveform by default) at --sample-rate or its declared rate."""
    import logging

    from xmodal.data.av import AudioConfig
    from xmodal.errors import ConfigError

    recorded = getattr(teacher, "audio_config", None)
    if recorded is not None:
        if args.sample_rate and args.sample_rate != recorded.sample_rate:
            raise ConfigError(f"--sample-rate {args.sample_rate}: the '{args.kind}' teacher {args.teacher} was "
                              f"trained on {recorded.features} features of {recorded.sample_rate} Hz audio; drop "
                              "--sample-rate (files at other rates are resampled)")
        return recorded
    rate = args.sample_rate or getattr(teacher, "sample_rate", None)
    if rate is None:
        raise ConfigError(f"teacher kind '{args.kind}' does not say its sample rate; pass --sample-rate")
    features = getattr(teacher, "input_features", "waveform")
    if features == "fbank":
        n_mels = int(teacher.config.n_mels)
        logging.getLogger(__name__).warning(
            "%s does not record its audio settings; using %d-band fbank with the default frames and "
            "normalisation at %d Hz", args.teacher, n_mels, rate)
        return AudioConfig(sample_rate=int(rate), features="fbank", n_mels=n_mels)
    return AudioConfig(sample_rate=int(rate), features=features)


register_command(
    "data pseudo-label",
    "label unlabelled clips with a speech teacher's confident transcripts (e.g. Whisper)",
    configure,
    run,
)

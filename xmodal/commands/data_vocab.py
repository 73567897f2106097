"""`xmodal data vocab`: train a sentencepiece subword vocabulary on a manifest's transcripts."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmodal.commands import register_command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="JSON-lines manifest whose 'transcript' fields to train on")
    p.add_argument("--out", required=True, type=Path,
                   help="model file to write (.model; e.g. beside the run, then data.vocab: that path)")
    p.add_argument("--size", type=int, default=500, help="number of subword units (default 500)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram",
                   help="sentencepiece algorithm (default unigram)")


def run(args: argparse.Namespace) -> int:
    from xmodal.data.av import read_av_manifest
    from xmodal.data.vocab import train_sentencepiece
    from xmodal.errors import ConfigError

    if args.out.suffix != ".model":
        raise ConfigError(f"--out {args.out}: name the file *.model (that is how data.vocab recognises it)")
    records = read_av_manifest(args.manifest)
    texts = [r.transcript for r in records if r.transcript]
    vocab = train_sentencepiece(texts, args.size, model_type=args.model_type, source=str(args.manifest))
    vocab.save(args.out)
    units = sum(len(vocab.encode(vocab.normalize(t))) for t in texts)
    chars = sum(len(vocab.normalize(t)) for t in texts)
    print(f"{args.out}: {len(vocab.pieces)} subword units ({len(vocab)} tokens with <blank> and <sos/eos>) from "
          f"{len(texts)} of {len(records)} transcripts; {units / max(len(texts), 1):.1f} units per utterance, "
          f"{chars / max(units, 1):.2f} characters per unit")
    return 0


register_command(
    "data vocab",
    "train a sentencepiece subword vocabulary on a manifest's transcripts",
    configure,
    run,
)

"""`xmodal data synth-grid`: write the synthetic GRID-like audio-visual corpus for lip-reading runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmodal.commands import register_command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (created; re-running is a no-op)")
    p.add_argument("--speakers", type=int, default=6, help="number of synthetic speakers (>= 3; default 6)")
    p.add_argument("--utterances", type=int, default=20, help="utterances per speaker (default 20)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed; same seed, same corpus (default 0)")
    p.add_argument("--roi-size", type=int, default=64, help="mouth-region side in pixels, even (default 64)")
    p.add_argument("--fps", type=float, default=25.0, help="video frame rate (default 25)")
    p.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate in Hz (default 16000)")
    p.add_argument("--codec", choices=("libx264", "mpeg4"), default=None,
                   help="video encoder (default: libx264 if available, else mpeg4)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from xmodal.data.grid import synthesize_grid

    corpus = synthesize_grid(args.out, speakers=args.speakers, utterances=args.utterances, seed=args.seed,
                             roi_size=args.roi_size, fps=args.fps, sample_rate=args.sample_rate,
                             codec=args.codec, progress=not args.no_progress)
    counts = corpus["counts"]
    print(f"{corpus['name']}: {sum(counts.values())} utterances from {len(corpus['speakers'])} speakers "
          f"({corpus['hours'] * 60:.1f} min) in {args.out}")
    for split in ("train", "val", "test"):
        speakers = ", ".join(corpus["splits"][split])
        print(f"  {args.out / corpus['manifests'][split]}: {counts[split]} utterances (speakers {speakers})")
    print(f"  {args.out / 'corpus.json'}: corpus description (seed {corpus['request']['seed']})")
    return 0


register_command(
    "data synth-grid",
    "write a synthetic GRID-like audio-visual speech corpus (eSpeak NG audio + rendered lip video)",
    configure,
    run,
)

"""`xmodal data manifest`: an LRS2/LRS3 folder or an auto_avsr label list → the lip job's JSON-lines manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmodal.commands import register_command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path,
                   help="LRS2/LRS3 folder holding <split>/<video id>/<utt>.mp4, or an auto_avsr label-list CSV")
    p.add_argument("--out", required=True, type=Path, help="manifest to write (JSON lines; written atomically)")
    p.add_argument("--layout", choices=("auto", "lrs", "auto_avsr"), default="auto",
                   help="corpus layout (default: a folder is 'lrs', a .csv file 'auto_avsr')")
    p.add_argument("--split", action="append", default=None, dest="splits",
                   help="lrs: split folder to take (repeatable; default: every folder with clips)")
    p.add_argument("--keep", type=Path, default=None,
                   help="lrs: LRS2 split list (<video id>/<utt> per line) naming the clips to take")
    p.add_argument("--root", type=Path, default=None,
                   help="auto_avsr: folder holding <dataset>/ (default: the folder above the CSV's labels/)")
    p.add_argument("--units", type=Path, default=None,
                   help="auto_avsr: its unigram*_units.txt, to decode token ids when the text files are absent")
    p.add_argument("--audio", choices=("auto", "none"), default="auto",
                   help="auto: a .wav beside the video, else the video's own audio track (default); none: no audio")


def run(args: argparse.Namespace) -> int:
    from xmodal.data.corpora import build_manifest
    from xmodal.errors import ConfigError

    layout = args.layout
    if layout == "auto":
        layout = "auto_avsr" if args.source.suffix.lower() == ".csv" else "lrs"
    if layout == "lrs":
        if args.root is not None or args.units is not None:
            raise ConfigError("--root and --units belong to --layout auto_avsr")
        options = {"splits": args.splits, "keep": args.keep, "audio": args.audio}
    else:
        if args.splits or args.keep is not None:
            raise ConfigError("--split and --keep belong to --layout lrs")
        options = {"root": args.root, "units": args.units, "audio": args.audio}
    s = build_manifest(layout, args.source, args.out, **options)
    print(f"{s.path}: {s.utterances} utterances, {s.labelled} with transcripts, {s.unlabelled} unlabelled; audio: "
          f"{s.audio_wav} .wav, {s.audio_in_video} in the video file, {s.no_audio} none")
    if s.outside_chars:
        first = ", ".join(f"{k} ({v!r})" for k, v in list(s.outside_chars.items())[:3])
        print(f"  {len(s.outside_chars)} transcripts have characters outside the default character vocabulary "
              f"(e.g. {first}): use a subword vocabulary or set data.vocab")
    return 0


register_command(
    "data manifest",
    "write a lip-reading manifest from an LRS2/LRS3 folder or an auto_avsr label list",
    configure,
    run,
)

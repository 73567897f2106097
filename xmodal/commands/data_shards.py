"""`xmodal data shards`: an image-text file (CSV/TSV/JSON lines) and its images → webdataset tar shards."""

from __future__ import annotations

import argparse

from xmodal.commands import register_command


def configure(p: argparse.ArgumentParser) -> None:
    from xmodal.data.shards import DEFAULT_PATTERN

    p.add_argument("source", help="image-text file: CSV/TSV (filepath, title) or JSON lines; image paths relative "
                                  "to its folder")
    p.add_argument("--out", required=True, help="folder for the shards and their shards.json index")
    p.add_argument("--pattern", default=DEFAULT_PATTERN,
                   help="shard file name with one %%d for the shard number (default "
                        f"{DEFAULT_PATTERN.replace('%', '%%')!r})")
    p.add_argument("--max-count", type=int, default=10000, help="images per shard (default 10000)")
    p.add_argument("--max-size", type=float, default=3e9, help="bytes per shard before the next starts (default 3e9)")
    p.add_argument("--image-key", default=None, help="column/key holding the image path (default: the usual names)")
    p.add_argument("--caption-key", default=None, help="column/key holding the caption(s) (default: the usual names)")
    p.add_argument("--sep", default=None, help="separator of a delimited file (default: from the extension/header)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="an unreadable image: leave it out and list it (default) or stop")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="write the images in a seeded random order (default: the file's order)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from xmodal.data.shards import write_shards

    s = write_shards(args.source, args.out, pattern=args.pattern, max_count=args.max_count, max_size=args.max_size,
                     image_key=args.image_key, caption_key=args.caption_key, sep=args.sep, on_error=args.on_error,
                     shuffle_seed=args.shuffle_seed, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"{len(s.files)} shard(s) in {s.out}: {s.samples} images, {s.captions} captions"
          + (f", {s.reencoded} re-encoded as PNG" if s.reencoded else ""))
    if s.skipped:
        print(f"  {len(s.skipped)} unreadable image(s) left out (listed in {s.index}; first: {s.skipped[0]})")
    print(f"  index: {s.index}")
    print(f"  data.shards: \"{s.pattern}\"")
    return 0


register_command("data shards", "write an image-text file and its images as webdataset tar shards", configure, run)

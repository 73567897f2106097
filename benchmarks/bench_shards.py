"""Loading speed: webdataset shards (`data.shards`) vs the CSV data set (`data.train`) over the same images.

One run, one set of synthetic-scenes images (PNG), one transform (open_clip's train transform at the image size:
random resized crop, RGB, tensor, CLIP normalisation) in the clip_distill job's own training data
(`training_data`), one batch size and loader worker count. Both loaders go
through the engine's `BatchStream` as training does: the CSV set as a map-style data set (engine sampler and
DataLoader, one image file per sample), the shards through `ShardLoader` (tar files read sequentially, a shuffle
buffer). Rounds alternate between the two, so machine noise hits both alike; each round is one pass over
`--batches` batches including worker start-up. Also reports how long `xmodal data shards` took to write them.

    python benchmarks/bench_shards.py
    python benchmarks/bench_shards.py --images 1024 --batch-size 64 --workers 2 --rounds 3 --no-report
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class _Captions:
    """A stand-in tokenizer: the caption as it is (tokenising costs both loaders the same)."""

    def __call__(self, texts: list[str]) -> list[str]:
        return list(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the stored images and the crop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both loaders")
    parser.add_argument("--batches", type=int, default=24, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per loader (alternating)")
    parser.add_argument("--max-count", type=int, default=256, help="images per shard")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="shard shuffle buffer (samples)")
    parser.add_argument("--data", type=Path, default=None, help="folder for the images and shards (default: temp)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()

    import torch
    from open_clip.transform import image_transform

    from xmodal.config import TrainConfig
    from xmodal.data.scenes import generate_scene_dataset
    from xmodal.data.shards import shard_paths, write_shards
    from xmodal.engine.data import BatchStream
    from xmodal.tasks.clip.config import DataConfig
    from xmodal.tasks.clip.data import View, collate_skipping
    from xmodal.tasks.clip.job import resolve_data, training_data

    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory() if args.data is None else None
    root = Path(tmp.name) if tmp else args.data
    t0 = time.perf_counter()
    generate_scene_dataset(root, args.images, 8, 8, seed=0, image_size=args.image_size, progress=False)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = write_shards(root / "train.csv", root / "shards", max_count=args.max_count, overwrite=True,
                           progress=False)
    wrote = time.perf_counter() - t0
    need = args.batches * args.batch_size
    if need > summary.samples:
        raise SystemExit(f"--batches {args.batches} × --batch-size {args.batch_size} needs {need} images; "
                         f"raise --images")
    # the clip_distill job's own training data for each source: the same views (transform, "tokenizer")
    views = [View(image_transform(args.image_size, is_train=True), _Captions())]
    train = TrainConfig(batch_size=args.batch_size, num_workers=args.workers)
    brace = str(Path(summary.pattern).relative_to(root))
    assert len(shard_paths(brace, root)) == len(summary.files)

    def job_stream(shards: str | None) -> BatchStream:
        cfg = DataConfig(root=str(root), shards=shards, shard_shuffle=args.shuffle_buffer)
        data = training_data(resolve_data(cfg), views, cfg, train)
        return BatchStream(data, global_batch=args.batch_size, num_workers=args.workers,
                           collate_fn=collate_skipping)

    def csv_stream():
        return job_stream(None)

    def shard_stream():
        return job_stream(brace)

    rates: dict[str, list[float]] = {"csv": [], "shards": []}
    for r in range(args.rounds):
        for name, make in (("csv", csv_stream), ("shards", shard_stream)):
            stream = make()
            stream.load_state({"epoch": r, "offset": 0})
            start = time.perf_counter()
            images = 0
            for _ in range(args.batches):
                batch = next(stream)
                images += len(batch["image"])
            rates[name].append(images / (time.perf_counter() - start))
            del stream
    csv, shards = statistics.median(rates["csv"]), statistics.median(rates["shards"])
    ratio = shards / csv
    lines = [
        f"{summary.samples} synthetic-scenes PNGs ({args.image_size} px; generated in {made:.1f} s), "
        f"{len(summary.files)} shards of up to {args.max_count} written by `xmodal data shards` in {wrote:.1f} s; "
        f"batch {args.batch_size}, {args.workers} loader workers, open_clip train transform at {args.image_size} px, "
        f"{args.batches} batches per round, {args.rounds} alternating rounds (median; worker start-up included). "
        "Both read files already in a local disk's page cache, so this is the loaders' CPU cost (decoding, "
        "transform, tar parsing, shuffle buffer), not storage access, where one sequential read per shard "
        "replaces an open per image.",
        "",
        "| loader | images/s (median) | rounds |",
        "|---|---|---|",
        f"| CSV data set (data.train) | {csv:.0f} | {', '.join(f'{x:.0f}' for x in rates['csv'])} |",
        f"| shards (data.shards) | {shards:.0f} | {', '.join(f'{x:.0f}' for x in rates['shards'])} |",
        "",
        f"shards vs csv: {ratio:.2f}x",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        from _report import write_section

        path = write_section("shards", "Data loading: webdataset shards vs CSV", body)
        print(f"wrote {path}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""`xmodal data synth-scenes`: write the synthetic-scenes image-caption world as an open_clip CSV data set."""

from __future__ import annotations

import argparse
import time

from xmodal.commands import register_command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; left alone when already complete)")
    p.add_argument("--train", type=int, default=5000, help="number of training images (default 5000)")
    p.add_argument("--val", type=int, default=500, help="number of validation images (default 500)")
    p.add_argument("--test", type=int, default=500, help="number of test images (default 500)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--captions-per-image", type=int, default=3, help="captions per image (default 3)")
    p.add_argument("--zeroshot-per-class", type=int, default=10,
                   help="single-object zero-shot images per object class (default 10; 0: use the test split's "
                        "single-object images)")
    p.add_argument("--no-holdout", action="store_true",
                   help="let multi-object attribute combinations repeat across splits")
    p.add_argument("--overwrite", action="store_true", help="replace a different world already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xmodal.data.scenes import SceneWorldConfig, generate_scene_dataset, zeroshot_task

    cfg = SceneWorldConfig(image_size=args.image_size, holdout_compositions=not args.no_holdout)
    start = time.perf_counter()
    world = generate_scene_dataset(
        args.out, args.train, args.val, args.test, seed=args.seed, captions_per_image=args.captions_per_image,
        cfg=cfg, zeroshot_per_class=args.zeroshot_per_class, overwrite=args.overwrite, progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    info = world.describe()
    task = zeroshot_task(world)
    print(f"synthetic-scenes world (seed {world.seed}, {cfg.image_size}x{cfg.image_size}) in {out} "
          f"[{elapsed:.1f}s]")
    for split in ("train", "val", "test"):
        print(f"  {out / (split + '.csv')}: {info['counts'][split]} images, {info['rows'][split]} captions")
    source = "zero-shot" if world.splits.get("zeroshot") else "test"
    print(f"  {out / 'zeroshot.json'}: {len(task.classnames)} classes (size colour shape), {len(task.labels)} "
          f"single-object images from the {source} split")
    print(f"  {out / 'scenes.jsonl'}: scene layouts and attribute-swapped twins")
    print(f"  {out / 'world.json'}: vocabulary and settings")
    print("  CSV columns: filepath, title (tab-separated; image paths relative to the CSV folder)")
    return 0


register_command("data synth-scenes", "generate the synthetic-scenes image-caption data set", configure, run)

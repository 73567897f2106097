"""`xmodal data synth-bev`: write synthetic driving scenes (LiDAR sweeps, camera images, 3D boxes) to a folder."""

from __future__ import annotations

import argparse
import time

from xmodal.commands import register_command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; left alone when already complete)")
    p.add_argument("--scenes", type=int, default=200, help="number of scenes (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed and settings give the same files")
    p.add_argument("--objects", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="objects per scene, inclusive (default 3 9)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="camera image size in pixels (default 96 160)")
    p.add_argument("--overwrite", action="store_true", help="replace a different data set already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from xmodal.data.bev import CAMERA, CLASSES, BEVWorldConfig, generate_bev_dataset

    cfg = BEVWorldConfig()
    if args.objects is not None:
        cfg = replace(cfg, objects=tuple(args.objects))
    if args.image_size is not None:
        cfg = replace(cfg, image_size=tuple(args.image_size))
    start = time.perf_counter()
    out = Path(generate_bev_dataset(args.out, args.scenes, args.seed, cfg, overwrite=args.overwrite,
                                    progress=not args.no_progress))
    h, w = cfg.image_size
    print(f"synthetic-bev: {args.scenes} scenes (seed {args.seed}) in {out} [{time.perf_counter() - start:.1f}s]")
    print(f"  classes: {', '.join(CLASSES)}; objects in x {list(cfg.x_range)} m, y {list(cfg.y_range)} m (ego frame)")
    print(f"  {out / 'points'}/<id>.npy: LiDAR points [P, 4] x, y, z, intensity")
    print(f"  {out / 'images' / CAMERA}/<id>.png: {h}x{w} camera images")
    print(f"  {out / 'labels'}/<id>.json: boxes (center, size, yaw, class) and calibration")
    print(f"  {out / 'dataset.json'}: settings and scene ids")
    return 0


register_command("data synth-bev", "generate synthetic driving scenes for BEV detection (LiDAR, camera, 3D boxes)",
                 configure, run)

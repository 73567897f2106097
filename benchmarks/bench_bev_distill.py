"""BEV detection: does UniDistill make a camera detector better than one trained alone, and what does the cache save?

The `bev_distill` job on one set of synthetic-bev scenes (train, and held-out val/test scenes drawn from other
seeds), per seed s (model initialisation and data order; the scenes stay the same):

- LiDAR teacher: trained on the training scenes (seed s) through the job's own path;
- camera alone: the camera student with the detection loss only (`preset: detection_only`);
- camera + each distillation preset (`--presets`, default `camera_from_lidar`: UniDistill's detection +
  100·feature + 40·relation + 10·response, and `camera_from_lidar_response`: detection + 10·response), the same
  student, steps and data, from that seed's teacher.

Every detector is scored on the validation and the test scenes (nuScenes rules). The preset with the best mean
validation mAP is chosen, and its test mAP is compared with the student trained alone: mean ± std over seeds, and
whether distillation raised the mAP by more than the seed std. Then the training step time of the UniDistill
student with the teacher online vs read from the teacher cache, alternating rounds.

    python benchmarks/bench_bev_distill.py                      # the full run (about 30 min on one CPU core)
    python benchmarks/bench_bev_distill.py --train-scenes 60 --teacher-steps 150 --steps 150 --no-report
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def model_block(sensor: str, width: int) -> dict:
    block = {"sensor": sensor, "channels": 32, "backbone_channels": width, "head_channels": width}
    if sensor == "camera":
        block.update(image_channels=48, depth=[2.0, 36.0], depth_bins=34)
    return block


def train_block(steps: int, seed: int, batch_size: int, lr: float) -> dict:
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": 0.01,
            "warmup_steps": max(1, steps // 20), "log_every": max(1, steps // 5), "eval_every": 0, "ckpt_every": 0,
            "seed": seed, "device": "cpu"}


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_bev_distill")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-scenes", type=int, default=800)
    ap.add_argument("--val-scenes", type=int, default=100)
    ap.add_argument("--test-scenes", type=int, default=100)
    ap.add_argument("--scene-seed", type=int, default=0,
                    help="generator seed of the training scenes (validation and test use the next two)")
    ap.add_argument("--cell", type=float, default=1.0, help="BEV cell size in metres (grid 32 m x 32 m)")
    ap.add_argument("--width", type=int, default=48, help="backbone and head channels of every detector")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=600, help="training steps of each camera student")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--timing-steps", type=int, default=20, help="steps per timing round (cache vs online)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presets", nargs="+", default=["camera_from_lidar", "camera_from_lidar_response"],
                    help="distillation presets to train and choose from on the validation scenes")
    ap.add_argument("--no-report", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args()
    if len(args.seeds) < 3:
        ap.error("give at least 3 seeds: the report compares the gain with the spread over seeds")

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from xmodal.config import JOBS, from_dict
    from xmodal.plugins import load_plugins
    from xmodal.tasks.bev.config import LOSS_PRESETS, BEVDistillConfig

    load_plugins()
    out = Path(args.out).resolve()
    grid = {"x_range": [0.0, 32.0], "y_range": [-16.0, 16.0], "cell": args.cell}
    data = {"root": str(out / "data"), "grid": grid,
            "synthetic": {"train": args.train_scenes, "val": args.val_scenes, "test": args.test_scenes,
                          "seed": args.scene_seed}}
    job = JOBS.get("bev_distill")

    unknown = [p for p in args.presets if p not in LOSS_PRESETS or p == "detection_only"]
    if unknown:
        ap.error(f"unknown distillation preset(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(p for p in LOSS_PRESETS if p != 'detection_only')}")

    def config(name: str, seed: int, *, teacher: dict | None, preset: str, steps: int,
               score: bool = True) -> BEVDistillConfig:
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = {"run_dir": str(run_dir), "data": data if score else {**data, "val": None, "test": None},
               "student": model_block("camera", args.width), "preset": preset,
               "train": train_block(steps, seed, args.batch_size, args.lr), "eval": {"batch_size": 16}}
        if teacher is not None:
            cfg["teacher"] = teacher
        return from_dict(BEVDistillConfig, cfg, source=f"bench_bev_distill {name}")

    def record(key: str, res: dict, val: float) -> None:
        rows.setdefault(key, {"mAP": [], "NDS": [], "val": []})
        rows[key]["mAP"].append(res["mAP"])
        rows[key]["NDS"].append(res["NDS"])
        rows[key]["val"].append(val)

    rows: dict[str, dict[str, list[float]]] = {}
    teacher_files: dict[int, str] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        teacher = {"model": model_block("lidar", args.width),
                   "train": train_block(args.teacher_steps, seed, args.batch_size, args.lr)}
        line = []
        for n, preset in enumerate(args.presets):
            # the first distilled run trains its teacher in its own run folder (the job's path); the teacher file is
            # kept outside that folder so the later runs reuse it
            res = job.run(config(f"{preset}_s{seed}", seed, teacher=teacher, preset=preset, steps=args.steps))
            if n == 0:
                kept = out / "teachers" / f"lidar_s{seed}.pt"
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(res["teacher_path"], kept)
                teacher_files[seed] = str(kept)
                teacher = {"path": str(kept)}
                record("teacher", res["teacher"], float("nan"))
            record(preset, res["student"], res["train"]["eval/mAP"])
            line.append(f"{preset} {res['student']['mAP']:.4f}")
        alone = job.run(config(f"alone_s{seed}", seed, teacher=None, preset="detection_only", steps=args.steps))
        record("alone", alone["student"], alone["train"]["eval/mAP"])
        print(f"seed {seed}: teacher mAP {rows['teacher']['mAP'][-1]:.4f}, camera alone {alone['student']['mAP']:.4f}, "
              f"{', '.join(line)}  [{time.perf_counter() - start:.0f}s]", flush=True)

    # step time: the full UniDistill student with the teacher online vs from the cache, alternating rounds
    from xmodal.engine.cache import build_cache
    from xmodal.tasks.bev.job import cache_source

    seed0, timed = args.seeds[0], "camera_from_lidar"
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    online_teacher = {"path": teacher_files[seed0]}
    cached_teacher = {"path": teacher_files[seed0], "cache": str(cache_dir)}
    source = cache_source(config("cache_source", seed0, teacher=cached_teacher, preset=timed, steps=1))
    t0 = time.perf_counter()
    build_cache(source.teacher, source.dataset, cache_dir, source.fingerprint, batch_size=source.batch_size,
                collate_fn=source.collate_fn, progress=False)
    cache_seconds = time.perf_counter() - t0
    times: dict[str, list[float]] = {"online": [], "cached": []}
    for r in range(-1, args.rounds):  # round -1: an untimed warm-up of each kind
        for kind, teacher in (("online", online_teacher), ("cached", cached_teacher)):
            steps = 3 if r < 0 else args.timing_steps
            res = job.run(config(f"time_{kind}_{r}", seed0, teacher=teacher, preset=timed, steps=steps,
                                 score=False))
            if r >= 0:
                times[kind].append(res["train_seconds"] / steps)
    per_step = {k: statistics.median(v) for k, v in times.items()}

    chosen = max(args.presets, key=lambda p: statistics.mean(rows[p]["val"]))
    gain = [u - a for u, a in zip(rows[chosen]["mAP"], rows["alone"]["mAP"])]
    spread = max(statistics.stdev(rows["alone"]["mAP"]), statistics.stdev(rows[chosen]["mAP"]))
    verdict = "raises" if statistics.mean(gain) > spread else "does not raise"
    lines = [
        f"synthetic-bev scenes: {args.train_scenes} training, {args.val_scenes} validation and {args.test_scenes} "
        f"held-out test scenes (seeds {args.scene_seed}/{args.scene_seed + 1}/{args.scene_seed + 2} of the generator), "
        f"BEV grid 32 m x 32 m at {args.cell} m; "
        f"LiDAR teacher {args.teacher_steps} steps, each camera student {args.steps} steps of batch "
        f"{args.batch_size}; seeds {', '.join(map(str, args.seeds))} (initialisation and data order); "
        f"mAP/NDS by the nuScenes rules (NDS over translation, scale and orientation errors: "
        f"(5 mAP + sum(1 - min(1, err))) / 8); the distillation preset is chosen by mean validation mAP; "
        f"{args.threads} thread(s).",
        "",
        "| detector | losses | val mAP (mean) | test mAP (mean ± std) | test NDS (mean ± std) | test mAP per seed |",
        "|---|---|---:|---:|---:|---|",
    ]
    described = {"teacher": ("LiDAR teacher", "detection"), "alone": ("camera alone", "detection")}
    for preset in args.presets:
        terms = " + ".join(f"{s.weight:g}·{s.name}" + (" (" + ", ".join(f"{k}={v:g}" for k, v in s.params.items())
                                                       + ")" if s.params else "")
                           for s in LOSS_PRESETS[preset]())
        described[preset] = (f"camera + `{preset}`" + (" (chosen)" if preset == chosen else ""), terms)
    for key, (label, terms) in described.items():
        per_seed = ", ".join(f"{v:.4f}" for v in rows[key]["mAP"])
        val = "" if key == "teacher" else f"{statistics.mean(rows[key]['val']):.4f}"
        lines.append(f"| {label} | {terms} | {val} | {mean_std(rows[key]['mAP'])} | {mean_std(rows[key]['NDS'])} "
                     f"| {per_seed} |")
    lines += [
        "",
        f"- distillation gain in camera test mAP (`{chosen}`, chosen on validation): {mean_std(gain)} (per seed: "
        f"{', '.join(f'{g:+.4f}' for g in gain)}); largest seed std of the two students {spread:.4f}: distillation "
        f"{verdict} the student's mAP by more than the seed std",
    ]
    for preset in args.presets:
        if preset != chosen:
            other = [u - a for u, a in zip(rows[preset]["mAP"], rows["alone"]["mAP"])]
            lines.append(f"- gain of `{preset}`: {mean_std(other)} (per seed: "
                         f"{', '.join(f'{g:+.4f}' for g in other)})")
    lines += [
        f"- training step time, camera + `{timed}` (median of {args.rounds} alternating rounds of "
        f"{args.timing_steps} steps): online teacher {1000 * per_step['online']:.0f} ms, teacher cache "
        f"{1000 * per_step['cached']:.0f} ms, online / cached = {per_step['online'] / per_step['cached']:.2f}x",
        f"- cache build (one teacher pass over {len(source.dataset)} training scenes, fp16): {cache_seconds:.1f} s",
    ]
    body = "\n".join(lines)
    print(body)
    (out / "results.json").write_text(json.dumps({"rows": rows, "chosen": chosen, "gain": gain,
                                                  "per_step": per_step}, indent=2))
    if not args.no_report:
        from _report import write_section

        print(f"wrote {write_section('bev_distill', 'BEV detection: UniDistill, LiDAR to camera', body)}")

if __name__ == "__main__":
    main()

"""Teacher cache at scale: `xmodal cache` with 2 processes vs 1, and the augmentation-aware cache.

On the synthetic image-caption world (xmodal/data/scenes.py) with the 64-px teacher of examples/clip_synthetic.yaml
(random weights: only the build's cost is measured here):

- `xmodal cache CONFIG` in one process and `torchrun --standalone --nproc_per_node 2 -m xmodal cache CONFIG`,
  side by side in one run, rounds alternating, one torch thread per process; wall time of the whole command
  (interpreter and model start-up included), and a check that both caches give identical lookups;
- the augmentation-aware cache (`teacher.cache_views`, K views per image) built by 2 processes: its build time and
  the storage per sample per view the manifest reports.

With `--quality`, also: a trained teacher, then the distilled student's R@1 trained from the augmentation-aware
cache vs with the online teacher seeing the same augmentation (fresh shared views per epoch), over seeds, and the
step-time ratio of the two.

    python benchmarks/bench_cache.py
    python benchmarks/bench_cache.py --quality    # + the student's R@1 and step time, cached vs online (3 seeds)
    python benchmarks/bench_cache.py --train 500 --rounds 1 --no-report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

TEACHER = {"embed_dim": 128,  # the teacher of examples/clip_synthetic.yaml (64 px in 8-px patches)
           "vision_cfg": {"image_size": 64, "patch_size": 8, "layers": 4, "width": 128, "head_width": 32},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
QUALITY_TEACHER = {**TEACHER, "vision_cfg": {**TEACHER["vision_cfg"], "patch_size": 16}}  # the demo's: 4x cheaper


def random_teacher(out: Path) -> Path:
    """The 64-px teacher with fixed random weights as an open_clip folder: every process loads the same one."""
    folder = out / "random_teacher"
    if not (folder / "open_clip_config.json").is_file():
        import torch

        from xmodal.students.clip import create_student
        from xmodal.students.export import export_open_clip

        torch.manual_seed(0)
        export_open_clip(create_student(TEACHER), TEACHER, folder, overwrite=True)
    return folder


def write_config(out: Path, args, *, views: int = 0, cache: Path | None = None, teacher_train: int = 0,
                 seed: int = 0, name: str = "job.yaml", steps: int = 0) -> Path:
    """A clip_distill config on the synthetic world (`views`: teacher.cache_views.count; `cache`: train from it)."""
    import yaml

    teacher: dict = {"model": str(random_teacher(out))}
    if teacher_train:
        teacher = {"model_cfg": QUALITY_TEACHER}
        teacher["train"] = {"steps": teacher_train, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1,
                            "warmup_steps": teacher_train // 10, "log_every": 50, "seed": 0}
    if views:
        teacher["cache_views"] = {"count": views, "flip": 0.5, "seed": 0}
    if cache is not None:
        teacher["cache"] = str(cache)
    cfg = {
        "job": "clip_distill", "run_dir": str(out / "runs" / name.removesuffix(".yaml")),
        "data": {"root": str(out / "data"), "caption_sampling": "first", "zeroshot": None,
                 "synthetic": {"train": args.train, "val": 200, "test": 300, "seed": 0, "image_size": 64}},
        "teacher": teacher,
        "student": {"shrink": {"vision": {"layers": 2, "width": 0.5}, "text": {"layers": 2, "width": 0.5}}},
        "losses": [{"name": "affinity", "weight": 1.0}],
        "train": {"steps": steps or 1, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1,
                  "warmup_steps": max(1, (steps or 1) // 10), "log_every": 25, "eval_every": 0, "ckpt_every": 0,
                  "seed": seed, "device": "cpu"},
        "eval": {"split": "test", "zeroshot": False},
    }
    if teacher_train:  # every config shares the one trained teacher folder
        cfg["run_dir"] = str(out / "runs" / "shared")
    path = out / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cache(config: Path, out_dir: Path, processes: int, args) -> tuple[float, float]:
    """Wall seconds of one `xmodal cache` command (a fresh folder), with one torch thread per process, and of its
    build alone (as the manifest records it: without interpreter, model and data set start-up)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    tail = ["cache", str(config), "--out", str(out_dir), "--no-progress", "--shard-size", str(args.shard_size),
            "--device", "cpu"]
    if processes == 1:
        cmd = [sys.executable, "-m", "xmodal", *tail]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "xmodal", *tail]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    print(done.stdout.strip(), flush=True)
    return seconds, json.loads((out_dir / "manifest.json").read_text())["build"]["seconds"]


def same_lookups(a: Path, b: Path) -> int:
    """Number of samples; raises when two caches differ in keys or in any looked-up value."""
    import torch

    from xmodal.engine import TeacherCache
    from xmodal.engine.cache import cache_items

    ca, cb = TeacherCache(a), TeacherCache(b)
    keys = sorted(cache_items(ca))
    if keys != sorted(cache_items(cb)):
        raise SystemExit(f"{a} and {b} hold different keys")
    ids, augs = [k for k, _ in keys], [v for _, v in keys]
    la, lb = ca.lookup(ids, augs), cb.lookup(ids, augs)
    for m in la:
        if not torch.equal(la[m].pooled, lb[m].pooled):
            raise SystemExit(f"{a} and {b} give different '{m}' values")
    return len(keys)


def speed(args, out: Path) -> tuple[str, dict]:
    from xmodal.commands.cache import describe_storage
    from xmodal.config import load_job_config
    from xmodal.tasks.clip.job import resolve_data

    config = write_config(out, args)
    resolve_data(load_job_config(config)[1].data)  # generate the world once, outside the timings
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for r in range(args.rounds):
        for p in ((1, 2) if r % 2 == 0 else (2, 1)):
            times[p].append(run_cache(config, out / f"cache{p}", p, args))
            print(f"round {r} {p} process(es): {times[p][-1][0]:.1f} s, build {times[p][-1][1]:.1f} s", flush=True)
    rows = same_lookups(out / "cache1", out / "cache2")
    t1, t2 = (statistics.median(t for t, _ in times[p]) for p in (1, 2))
    b1, b2 = (statistics.median(b for _, b in times[p]) for p in (1, 2))
    views_cfg = write_config(out, args, views=args.views, name="views.yaml")
    t_views, b_views = run_cache(views_cfg, out / "cache_views", 2, args)
    plain = json.loads((out / "cache2" / "manifest.json").read_text())["storage"]
    aug = json.loads((out / "cache_views" / "manifest.json").read_text())["storage"]
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    body = f"""`xmodal cache` on the synthetic world: {args.train} training images (64 px), the teacher of
examples/clip_synthetic.yaml (64 px in 8-px patches, 4+4 layers, width 128; random weights: the build's cost only),
float16, shards of {args.shard_size}, one torch thread per process, median of {args.rounds} round(s) alternating.
"command" is the wall time of the whole `xmodal cache` (interpreter, model and data set start-up included, which
every process pays in full: the data identity hashes every image), "build" the part the processes share (as the
manifest records it). This machine has {cores} cores, so 2 processes can give at most 2x; other jobs were sharing
them (load average {load:.1f} at the end), which lowers it.

| processes | command (s) | build (s) |
|---|---|---|
| 1 | {t1:.1f} | {b1:.1f} |
| 2 | {t2:.1f} | {b2:.1f} |

**2 processes vs 1: {t1 / t2:.2f}x** (whole command; the build alone {b1 / b2:.2f}x). Both caches hold the same
{rows} samples and give identical lookups.

Augmentation-aware cache (`teacher.cache_views: {{count: {args.views}}}`, crop + flip, 2 processes):
{args.views} × {args.train} rows in {t_views:.1f} s, build {b_views:.1f} s ({b_views / b2:.2f}x the one-view build).

| cache | bytes per sample per view | bytes per sample |
|---|---|---|
| one view | {plain['bytes_per_sample_per_view']:.1f} | {plain['bytes_per_sample']:.1f} |
| {args.views} views | {aug['bytes_per_sample_per_view']:.1f} | {aug['bytes_per_sample']:.1f} |

Per view: image and text embeddings (128 float16 each, 256 bytes each), the view's crop box and flip (5 float32,
20 bytes) and its id in ids.json ({describe_storage(aug)}).
"""
    return body, {"t1": t1, "t2": t2, "views": t_views, "storage": aug}


def quality(args, out: Path) -> str:
    """Distilled student's R@1: from the augmentation-aware cache vs the online teacher on the same augmentation."""
    import torch

    from xmodal.config import load_job_config
    from xmodal.tasks.clip import job

    base = write_config(out, args, teacher_train=args.teacher_steps, views=args.views, name="teacher.yaml")
    _, cfg = load_job_config(base)
    start = time.perf_counter()
    job.obtain_teacher(cfg.teacher, job.resolve_data(cfg.data), cfg.data, Path(cfg.run_dir), torch.device("cpu"))
    teacher_s = time.perf_counter() - start  # zero when the teacher of these settings was trained before
    cache = out / "cache_quality"
    manifest = cache / "manifest.json"
    if not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        run_cache(base, cache, 2, args)
    rows = []
    for seed in range(args.seeds):
        res = {}
        for kind in ("online", "cached"):
            cfg_path = write_config(out, args, teacher_train=args.teacher_steps, views=args.views, seed=seed,
                                    cache=cache if kind == "cached" else None, name=f"{kind}{seed}.yaml",
                                    steps=args.student_steps)
            _, cfg = load_job_config(cfg_path)
            run_dir = out / "runs" / f"{kind}{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            result = _run_in(run_dir, cfg, job)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
            rates = rates[1:] or rates  # past the first window (warm-up) when there are more
            step_s = statistics.median(64 / r for r in rates)
            recall = {k: v for k, v in result["stage0"].items() if str(k).endswith("_R@1")}
            res[kind] = (recall, step_s)
        rows.append(res)
        print(seed, res, flush=True)
    return _quality_table(rows, args, teacher_s)


def _run_in(run_dir: Path, cfg, job):
    """Run the job with its stage in `run_dir` and the trained teacher read from the shared folder."""
    shared = Path(cfg.run_dir)
    original = job.obtain_teacher
    job.obtain_teacher = lambda tcfg, paths, data_cfg, _run, device: original(tcfg, paths, data_cfg, shared, device)
    try:
        cfg.run_dir = str(run_dir)
        return job.run(cfg)
    finally:
        job.obtain_teacher = original


def _quality_table(rows, args, teacher_s: float) -> str:
    lines = [f"Teacher: the same 64-px CLIP trained {args.teacher_steps} steps ({teacher_s:.0f} s); student: half "
             f"width, 2+2 layers, affinity loss, {args.student_steps} steps of 64, evaluated on the 300-image test "
             f"split. Both runs see random resized crops and flips ({args.views}-view recipe): the cached run replays "
             f"one of the {args.views} stored views per epoch, the online run draws a fresh view per epoch and runs "
             "the teacher on it.", "",
             "| seed | online R@1 (i→t / t→i) | cached R@1 (i→t / t→i) | online step (s) | cached step (s) |",
             "|---|---|---|---|---|"]
    gains, ratios = [], []
    for seed, res in enumerate(rows):
        cells = [" / ".join(f"{res[k][0][d]:.3f}" for d in sorted(res[k][0])) for k in ("online", "cached")]
        ratios.append(res["online"][1] / res["cached"][1])
        gains.append(statistics.mean(res["cached"][0].values()) - statistics.mean(res["online"][0].values()))
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} | {res['online'][1]:.3f} | {res['cached'][1]:.3f} |")
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return "\n".join(lines) + (
        f"\n\nMean R@1 over both directions, cached − online: {statistics.mean(gains):+.3f} ± {spread:.3f} "
        f"(per seed {', '.join(f'{g:+.3f}' for g in gains)}). **Step time online / cached: "
        f"{statistics.median(ratios):.2f}x** (median over seeds of the training loop's median step time).\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_cache")
    ap.add_argument("--train", type=int, default=2000, help="synthetic training images")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--views", type=int, default=4, help="views per image of the augmentation-aware cache")
    ap.add_argument("--quality", action="store_true", help="also the R@1 comparison (trains a teacher)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()

    import logging

    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    body, _ = speed(args, out)
    if args.quality:
        body += "\n### Student from the augmentation-aware cache vs the online teacher on the same augmentation\n\n"
        body += quality(args, out)
    body += f"\nWhole benchmark: {time.perf_counter() - start:.0f} s.\n"
    print(body)
    if not args.no_report:
        from _report import write_section

        write_section("cache", "Teacher cache: 2 processes vs 1, augmentation-aware cache", body)


if __name__ == "__main__":
    main()

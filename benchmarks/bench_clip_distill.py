"""Distillation gain on the synthetic image-caption world: distilled student vs the same student from scratch.

Protocol, with the settings of `xmodal demo` (any of them can be changed with --set, as for the demo): one teacher
(trained contrastively on the synthetic world, reused across runs). The scratch student's learning rate is tuned
on the validation split (seed 0) over --lrs; then for each seed the student is trained (a) from scratch with the
tuned rate and the CLIP loss, (b) with weight inheritance + affinity mimicking at the demo's rate, for the same
steps. Reported on the held-out test split: retrieval R@1/R@5 both ways and zero-shot top-1 (mean ± std over
seeds), the gain of (b) over (a) per seed (mean ± std of the differences, and in how many seeds (b) is ahead), and
the first evaluated step at which the distilled student's validation T→I R@1 reaches the scratch student's final.

    python benchmarks/bench_clip_distill.py            # full protocol (3 seeds), writes BENCHMARKS.md
    python benchmarks/bench_clip_distill.py --quick    # a smoke run, no report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

METRICS = [
    ("image_to_text_R@1", "I→T R@1"),
    ("image_to_text_R@5", "I→T R@5"),
    ("text_to_image_R@1", "T→I R@1"),
    ("text_to_image_R@5", "T→I R@5"),
    ("zeroshot_top1", "zero-shot top-1"),
]
RETRIEVAL = [key for key, _ in METRICS if "R@" in key]


def val_curve(run_dir: Path, key: str = "eval/text_to_image_R@1") -> list[tuple[int, float]]:
    from xmodal.engine import read_metrics

    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, v in curve if v >= target), None)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def mean_std(xs: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(xs) == 1:
        return f"{xs[0]:{sign}.1%}"
    return f"{statistics.mean(xs):{sign}.1%} ± {statistics.stdev(xs):.1%}"


def gain_summary(distilled: list[dict], scratch: list[dict], key: str) -> dict:
    """Per-seed differences distilled − scratch: mean, std, seeds ahead, and whether the mean exceeds the std."""
    diffs = [d[key] - s[key] for d, s in zip(distilled, scratch)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"diffs": diffs, "mean": statistics.mean(diffs), "std": std, "ahead": sum(x > 0 for x in diffs),
            "significant": len(diffs) > 1 and statistics.mean(diffs) > std}


def train_one(cfg_dict: dict, kind: str, seed: int, lr: float, folder: Path, teacher=None) -> tuple[float, float]:
    """Train one student, write its test-split results beside it; (wall, CPU) seconds. Runs in a worker process
    too: there it finds the data and the trained teacher on disk (one torch thread per worker)."""
    import torch

    from xmodal.config import from_dict
    from xmodal.device import resolve_device
    from xmodal.io import atomic_write_json
    from xmodal.tasks.clip.demo import DemoConfig, demo_data, demo_teacher, train_student
    from xmodal.tasks.clip.job import evaluate_clip

    w, c = time.perf_counter(), time.process_time()
    cfg = from_dict(DemoConfig, cfg_dict)
    device = resolve_device(cfg.student_train.device)
    if teacher is None:
        torch.set_num_threads(1)
    data_cfg, paths = demo_data(cfg, progress=False)
    teacher = teacher or demo_teacher(cfg, paths, data_cfg, device)
    student = train_student(cfg, kind, teacher, paths, data_cfg, device, seed, folder, lr=lr)
    atomic_write_json(folder / "results_test.json",
                      evaluate_clip(student, paths.test, paths.zeroshot, cfg.eval_batch_size, device))
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_clip_distill")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", default=None,
                    help="scratch learning rates to tune over (default: the demo's scratch rate ×0.5, ×1, ×2)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change a demo setting, e.g. --set student_train.steps=500 (the report names it)")
    ap.add_argument("--workers", type=int, default=1,
                    help="student runs side by side in worker processes, one torch thread each (default 1: in turn)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()

    from xmodal.config import apply_overrides, from_dict, to_dict
    from xmodal.device import resolve_device
    from xmodal.tasks.clip.demo import QUICK, DemoConfig, cpu_threads

    overrides = list(args.overrides)
    if args.quick:
        overrides = QUICK + overrides
        args.seeds, args.no_report = 2, True
    cfg = from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), overrides + [f"out={args.out}"]),
                    source="bench_clip_distill.py --set")
    demo_scratch_lr = cfg.scratch_lr if cfg.scratch_lr is not None else cfg.student_train.lr
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [demo_scratch_lr * f for f in (0.5, 1.0, 2.0)]
    out = Path(cfg.out)
    device = resolve_device(cfg.student_train.device)
    with cpu_threads(cfg.threads, device) as note:
        if note:
            print(f"threads: {note.strip(' ()')}", flush=True)
        measure(args, cfg, lrs, demo_scratch_lr, out, device)


def measure(args, cfg, lrs: list[float], demo_scratch_lr: float, out: Path, device) -> None:
    """Train and evaluate every run of the protocol, print the report and write it to BENCHMARKS.md."""
    import torch

    from xmodal.config import to_dict
    from xmodal.fingerprint import hash_json
    from xmodal.io import atomic_write_json
    from xmodal.students.clip import shrink_model_cfg
    from xmodal.tasks.clip.demo import demo_data, demo_teacher
    from xmodal.tasks.clip.job import build_student, count_parameters, evaluate_clip

    t0, c0 = time.perf_counter(), cpu_seconds()
    data_cfg, paths = demo_data(cfg, progress=False)
    exported = set((out / "teacher").glob("*/open_clip/open_clip_config.json"))
    teacher = demo_teacher(cfg, paths, data_cfg, device)
    teacher_reused = not set((out / "teacher").glob("*/open_clip/open_clip_config.json")) - exported
    teacher_wall, teacher_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    student_cfg = shrink_model_cfg(teacher.model_cfg, cfg.shrink)
    student_runs: list[tuple[float, float]] = []

    # finished runs are reused only under the same settings: other settings train in another folder
    settings_key = hash_json({k: v for k, v in to_dict(cfg).items() if k != "out"})[:10]

    def run_dir(kind: str, seed: int, lr: float) -> Path:
        return out / "students" / settings_key / f"{kind}_seed{seed}_lr{lr:g}"

    def train_all(jobs: list[tuple[str, int, float]]) -> None:
        """Train the runs that have no results yet, `--workers` at a time."""
        todo = [(kind, seed, lr, run_dir(kind, seed, lr)) for kind, seed, lr in jobs
                if not (run_dir(kind, seed, lr) / "results_test.json").is_file()]
        if args.workers > 1 and len(todo) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(args.workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
                student_runs.extend(pool.map(train_one, [to_dict(cfg)] * len(todo), *zip(*todo)))
        else:
            student_runs.extend(train_one(to_dict(cfg), *job, teacher=teacher) for job in todo)

    def result(kind: str, seed: int, lr: float) -> tuple[dict, list]:
        folder = run_dir(kind, seed, lr)
        return json.loads((folder / "results_test.json").read_text()), val_curve(folder)

    train_all([("scratch", 0, lr) for lr in lrs] + [("distilled", s, cfg.student_train.lr) for s in range(args.seeds)])
    sweep = {lr: result("scratch", 0, lr) for lr in lrs}
    best_lr = max(lrs, key=lambda lr: sweep[lr][1][-1][1])
    train_all([("scratch", s, best_lr) for s in range(1, args.seeds)])
    teacher_test = evaluate_clip(teacher, paths.test, paths.zeroshot, cfg.eval_batch_size, device)
    rows: dict[str, list[dict]] = {"scratch": [], "distilled": []}
    reach = []
    for seed in range(args.seeds):
        scratch = result("scratch", seed, best_lr)
        distilled = result("distilled", seed, cfg.student_train.lr)
        rows["scratch"].append(scratch[0])
        rows["distilled"].append(distilled[0])
        reach.append(steps_to_reach(distilled[1], scratch[1][-1][1]))
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    n_teacher = count_parameters(teacher.model)
    n_student = count_parameters(build_student(teacher, student_cfg, None, device)[0].model)

    changed = f" with {' '.join(args.overrides)}" if args.overrides else ""
    lines = [
        f"Settings: `xmodal demo`'s defaults{changed} (the teacher {cfg.teacher_train.steps} steps of batch "
        f"{cfg.teacher_train.batch_size}, every student {cfg.student_train.steps} steps of batch "
        f"{cfg.student_train.batch_size}; {cfg.data_train} training images at "
        f"{teacher.model_cfg['vision_cfg']['image_size']} px). Teacher: {n_teacher:,} params; student {n_student:,} "
        f"params (half width and depth); {args.seeds} seeds; scratch learning rate tuned over {lrs} on validation "
        f"T→I R@1 → {best_lr:g} (the demo's: {demo_scratch_lr:g}); distilled at {cfg.student_train.lr:g}.",
        "",
        "| model (test split) | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
        "| teacher | " + " | ".join(f"{teacher_test[k]:.1%}" if k in teacher_test else "–" for k, _ in METRICS) + " |",
    ]
    for kind, label in (("scratch", f"scratch (lr {best_lr:g})"), ("distilled", "inheritance + affinity")):
        cells = [mean_std([r[k] for r in rows[kind]]) if k in rows[kind][0] else "–" for k, _ in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gains = {k: gain_summary(rows["distilled"], rows["scratch"], k) for k, _ in METRICS if k in rows["scratch"][0]}
    lines += ["", "Gain of distillation, per seed (distilled − scratch; mean ± std over seeds, seeds where "
                  "distilled is ahead):", ""]
    for key, name in METRICS:
        if key in gains:
            g = gains[key]
            verdict = "larger than its std" if g["significant"] else "NOT larger than its std"
            lines.append(f"- {name}: {mean_std(g['diffs'], signed=True)} ({g['ahead']}/{len(g['diffs'])} seeds; "
                         f"{verdict})")
    reach_txt = ", ".join("not reached" if r is None else str(r) for r in reach)
    n = torch.get_num_threads()
    threads = f"{n} torch thread{'s' * (n != 1)}"
    if args.workers > 1:
        threads += f", student runs {args.workers} side by side with one thread each"
    per_run = statistics.mean(w for w, _ in student_runs) if student_runs else 0.0
    per_run_cpu = statistics.mean(c for _, c in student_runs) if student_runs else 0.0
    lines += [
        f"- steps for the distilled student to reach the scratch student's final validation T→I R@1 "
        f"(evaluated every {cfg.student_train.eval_every} steps; scratch used {cfg.student_train.steps}): {reach_txt}",
        f"- time: {elapsed / 60:.1f} min wall, {cpu / 60:.1f} min CPU for the whole protocol "
        f"(data + teacher {teacher_wall:.0f} s wall / {teacher_cpu:.0f} s CPU"
        f"{', the teacher reused from an earlier run' if teacher_reused else ''}; {len(student_runs)} student runs "
        f"trained here, {per_run:.0f} s wall / {per_run_cpu:.0f} s CPU each on average, evaluation included; "
        f"{threads})",
    ]
    body = "\n".join(lines)
    print(body)
    atomic_write_json(out / "bench_results.json", {"teacher": teacher_test, "rows": rows, "best_lr": best_lr,
                                                   "gains": gains, "reach": reach, "overrides": args.overrides})
    if not args.no_report:
        from _report import write_section

        write_section("clip_distill", "CLIP compression: distillation gain on the synthetic world", body)


if __name__ == "__main__":
    main()

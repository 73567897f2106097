"""Distillation gain on the synthetic image-caption world: distilled student vs the same student from scratch.

Protocol: one teacher (trained contrastively on the synthetic world, reused across runs). The scratch student's
learning rate is tuned on the validation split (seed 0); then for each seed the student is trained (a) from
scratch with the tuned rate and the CLIP loss, (b) with weight inheritance + affinity mimicking, for the same
steps. Reported on the held-out test split: R@1 both directions (mean ± std over seeds), and the first evaluated
step at which the distilled student's validation T→I R@1 reaches the scratch student's final value.

    python benchmarks/bench_clip_distill.py            # full protocol (3 seeds), writes BENCHMARKS.md
    python benchmarks/bench_clip_distill.py --quick    # a smoke run, no report
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def val_curve(run_dir: Path, key: str = "eval/text_to_image_R@1") -> list[tuple[int, float]]:
    from xmodal.engine import read_metrics

    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, v in curve if v >= target), None)


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.1%}"
    return f"{statistics.mean(xs):.1%} ± {statistics.stdev(xs):.1%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_clip_distill")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="scratch learning rates to tune over")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()

    import torch

    from xmodal.config import LossSpec, apply_overrides, from_dict, to_dict
    from xmodal.device import resolve_device
    from xmodal.students.clip import shrink_model_cfg
    from xmodal.tasks.clip.config import DataConfig, InheritConfig, SyntheticDataConfig, TeacherConfig
    from xmodal.tasks.clip.demo import DemoConfig
    from xmodal.tasks.clip.job import (
        build_student,
        evaluate_clip,
        make_evaluator,
        obtain_teacher,
        resolve_data,
        train_clip,
    )

    overrides = ["student_train.eval_every=25"]
    if args.quick:
        overrides += ["data_train=400", "data_val=64", "data_test=128", "teacher_train.steps=30",
                      "student_train.eval_every=10"]
        args.steps, args.seeds, args.lrs, args.no_report = 20, 2, "1e-3,2e-3", True
    cfg = from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), overrides + [f"out={args.out}"]))
    cfg.student_train.steps = args.steps
    out = Path(cfg.out)
    device = resolve_device("auto")
    data_cfg = DataConfig(root=str(out / "data"), synthetic=SyntheticDataConfig(
        train=cfg.data_train, val=cfg.data_val, test=cfg.data_test, seed=0))
    paths = resolve_data(data_cfg)
    t0 = time.perf_counter()
    teacher = obtain_teacher(TeacherConfig(model_cfg=copy.deepcopy(cfg.teacher_cfg), train=cfg.teacher_train),
                             paths, data_cfg, out, device)
    teacher.model.eval().requires_grad_(False)
    student_cfg = shrink_model_cfg(teacher.model_cfg, cfg.shrink)

    def run(kind: str, seed: int, lr: float) -> tuple[dict, list]:
        train = copy.deepcopy(cfg.student_train)
        train.seed, train.lr = seed, lr
        torch.manual_seed(seed)
        distil = kind == "distilled"
        student, _ = build_student(teacher, student_cfg, InheritConfig() if distil else None, device)
        run_dir = out / f"{kind}_seed{seed}_lr{lr:g}"
        if not (run_dir / "results_test.json").is_file():
            train_clip(student, paths, data_cfg, train, run_dir, device=device,
                       losses=cfg.distill_losses if distil else [LossSpec("clip")],
                       teacher=teacher if distil else None,
                       evaluator=make_evaluator(student, paths, "val", cfg.eval_batch_size, False, device))
            from xmodal.io import atomic_write_json

            atomic_write_json(run_dir / "results_test.json",
                              evaluate_clip(student, paths.test, None, cfg.eval_batch_size, device))
        return json.loads((run_dir / "results_test.json").read_text()), val_curve(run_dir)

    lrs = [float(x) for x in args.lrs.split(",")]
    sweep = {lr: run("scratch", 0, lr) for lr in lrs}
    best_lr = max(lrs, key=lambda lr: sweep[lr][1][-1][1])
    teacher_test = evaluate_clip(teacher, paths.test, None, cfg.eval_batch_size, device)
    rows = {"scratch": [], "distilled": []}
    reach = []
    for seed in range(args.seeds):
        scratch = sweep[best_lr] if seed == 0 else run("scratch", seed, best_lr)
        distilled = run("distilled", seed, cfg.student_train.lr)
        rows["scratch"].append(scratch[0])
        rows["distilled"].append(distilled[0])
        reach.append(steps_to_reach(distilled[1], scratch[1][-1][1]))
    elapsed = time.perf_counter() - t0

    def col(kind: str, key: str) -> list[float]:
        return [r[key] for r in rows[kind]]

    lines = [
        f"Teacher: {sum(p.numel() for p in teacher.model.parameters()):,} params; student "
        f"{sum(p.numel() for p in build_student(teacher, student_cfg, None, device)[0].model.parameters()):,} params "
        f"(half width and depth); {args.steps} steps of batch {cfg.student_train.batch_size} for every student; "
        f"{args.seeds} seeds; scratch learning rate tuned over {lrs} on validation T→I R@1 → {best_lr:g}.",
        "",
        "| model (test split) | I→T R@1 | T→I R@1 | I→T R@5 | T→I R@5 |",
        "|---|---:|---:|---:|---:|",
        f"| teacher | {teacher_test['image_to_text_R@1']:.1%} | {teacher_test['text_to_image_R@1']:.1%} | "
        f"{teacher_test['image_to_text_R@5']:.1%} | {teacher_test['text_to_image_R@5']:.1%} |",
    ]
    for kind, label in (("scratch", f"scratch (lr {best_lr:g})"), ("distilled", "inheritance + affinity")):
        lines.append(f"| {label} | {mean_std(col(kind, 'image_to_text_R@1'))} | "
                     f"{mean_std(col(kind, 'text_to_image_R@1'))} | {mean_std(col(kind, 'image_to_text_R@5'))} | "
                     f"{mean_std(col(kind, 'text_to_image_R@5'))} |")
    def gain(key: str) -> float:
        return statistics.mean(col("distilled", key)) - statistics.mean(col("scratch", key))

    gain_t2i, gain_i2t = gain("text_to_image_R@1"), gain("image_to_text_R@1")
    reach_txt = ", ".join("not reached" if r is None else str(r) for r in reach)
    lines += [
        "",
        f"- distilled − scratch, R@1: I→T {gain_i2t:+.1%}, T→I {gain_t2i:+.1%} (mean over seeds)",
        f"- steps for the distilled student to reach the scratch student's final validation T→I R@1 "
        f"(evaluated every {cfg.student_train.eval_every} steps; scratch used {args.steps}): {reach_txt}",
        f"- wall time for the whole protocol: {elapsed / 60:.1f} min",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        from _report import write_section

        write_section("clip_distill", "CLIP compression: distillation gain on the synthetic world", body)


if __name__ == "__main__":
    main()

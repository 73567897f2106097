"""Logit distillation losses side by side on one small synthetic classification task: accuracy and step cost.

Task (synthetic, seeded, deterministic): 10 classes, each a mixture of 3 Gaussian clusters in an 8-D latent space,
mapped to 32-D inputs by a fixed random tanh network plus noise; classes overlap, so a good teacher's soft labels
carry more than the hard labels do. A teacher MLP (32-256-256-10) trains once on 20,000 samples. The student
(MLP 32-32-10) then trains on 1,000 labelled samples, the same steps, batch and optimiser for every method:
cross-entropy on the labels alone (student-only), or cross-entropy plus one registered logit loss against the
teacher's logits on the same batch (read from a precomputed table, as from a teacher cache). Every method runs
with each seed (student init and batch order); accuracy is on 10,000 held-out samples.

Step time: after training, every method's step (forward, loss, backward, Adam) is timed in interleaved rounds,
so machine noise hits all alike; the median is reported relative to the student-only step.

    python benchmarks/bench_losses.py               # 3 seeds, writes the BENCHMARKS.md section
    python benchmarks/bench_losses.py --quick --no-report
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CLASSES, LATENT, DIM, CLUSTERS = 10, 8, 32, 3

# method → the registered loss (with its parameters) added to the student's cross-entropy
METHODS = {
    "student-only": None,
    "hinton": {"name": "hinton", "params": {"temperature": 4.0}},
    "reverse_kl": {"name": "reverse_kl", "params": {"temperature": 4.0}},
    "js": {"name": "js", "params": {"temperature": 4.0}},
    "topk_kl": {"name": "topk_kl", "params": {"temperature": 4.0, "k": 3}},
    "dkd": {"name": "dkd", "params": {"temperature": 4.0, "alpha": 1.0, "beta": 8.0}},
    "dist": {"name": "dist", "params": {"temperature": 4.0}},
    "taid": {"name": "taid", "params": {"temperature": 4.0}},  # total_steps set from --steps
    "sinkd": {"name": "sinkd", "params": {"temperature": 4.0}},
}


def synthetic_task(n: int, seed: int):
    """(x [n, 32], y [n]) from the fixed synthetic world (the world is seed 0; `seed` draws the samples)."""
    import torch

    world = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(CLASSES, CLUSTERS, LATENT, generator=world)
    w1 = torch.randn(LATENT, 64, generator=world) / LATENT ** 0.5
    w2 = torch.randn(64, DIM, generator=world) / 8.0
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    k = torch.randint(0, CLUSTERS, (n,), generator=g)
    z = centres[y, k] + 1.2 * torch.randn(n, LATENT, generator=g)
    x = torch.tanh(torch.tanh(z @ w1 * 1.5) @ w2 * 2.0) + 0.05 * torch.randn(n, DIM, generator=g)
    return x, y


def mlp(widths: list[int], seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_teacher(x, y, steps: int, batch: int):
    import torch
    import torch.nn.functional as F

    teacher = mlp([DIM, 256, 256, CLASSES], seed=0)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = F.cross_entropy(teacher(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


class Run:
    """One student trained by one method: its model, optimiser, loss and step."""

    def __init__(self, method: str, seed: int, steps: int, lr: float):
        import torch

        from xmodal.losses import build_losses

        spec = METHODS[method]
        self.student = mlp([DIM, 32, CLASSES], seed=100 + seed)
        self.losses = None
        if spec is not None:
            params = dict(spec["params"])
            if spec["name"] == "taid":
                params["total_steps"] = steps
            self.losses = build_losses([{"name": spec["name"], "params": params}])
        trainable = list(self.student.parameters()) + ([] if self.losses is None else list(self.losses.parameters()))
        self.opt = torch.optim.Adam(trainable, lr=lr)

    def step(self, x, y, zt) -> float:
        import torch.nn.functional as F

        from xmodal.features import Features

        zs = self.student(x)
        loss = F.cross_entropy(zs, y)
        if self.losses is not None:
            student = {"image": Features(zs, logits=zs)}
            teacher = {"image": Features(zt, logits=zt)}
            loss = loss + self.losses(student, teacher, {"label": y}).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500, help="student steps (every method)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--student-samples", type=int, default=1000)
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--timing-rounds", type=int, default=15, help="interleaved rounds of timed steps")
    ap.add_argument("--timing-steps", type=int, default=40, help="steps per method per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, few steps")
    ap.add_argument("--no-report", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.teacher_steps, args.timing_rounds = 1, 200, 500, 3

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x_big, y_big = synthetic_task(20000, seed=0)
    x_test, y_test = synthetic_task(10000, seed=1)
    x_small, y_small = synthetic_task(args.student_samples, seed=2)
    teacher = train_teacher(x_big, y_big, args.teacher_steps, 256)
    with torch.no_grad():
        z_small = teacher(x_small)  # the teacher's logits, looked up per batch like a teacher cache
    teacher_acc = accuracy(teacher, x_test, y_test)
    print(f"teacher test accuracy {teacher_acc:.1%}", flush=True)

    acc: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:
            run = Run(method, seed, args.steps, args.lr)
            g = torch.Generator().manual_seed(seed)
            for _ in range(args.steps):
                idx = torch.randint(0, len(x_small), (args.batch_size,), generator=g)
                run.step(x_small[idx], y_small[idx], z_small[idx])
            acc[method].append(accuracy(run.student, x_test, y_test))
            print(f"seed {seed} {method:<12} test accuracy {acc[method][-1]:.1%}", flush=True)

    # step cost: interleaved rounds, fresh students, same batches for every method
    runs = {m: Run(m, 0, args.steps, args.lr) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    g = torch.Generator().manual_seed(123)
    batches = [torch.randint(0, len(x_small), (args.batch_size,), generator=g) for _ in range(args.timing_steps)]
    for r in range(args.timing_rounds + 1):
        for method, run in runs.items():
            t0 = time.perf_counter()
            for idx in batches:
                run.step(x_small[idx], y_small[idx], z_small[idx])
            if r:  # round 0 warms up
                times[method].append((time.perf_counter() - t0) / len(batches))
    step = {m: statistics.median(v) for m, v in times.items()}
    base = step["student-only"]

    def mean_std(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.1%}" + (f" ± {statistics.stdev(xs):.1%}" if len(xs) > 1 else "")

    lines = [
        f"Synthetic 10-class task (32-D inputs, overlapping classes); teacher MLP 32-256-256-10 "
        f"(test accuracy {teacher_acc:.1%}); student MLP 32-32-10 on {args.student_samples} labelled samples, "
        f"{args.steps} steps, batch {args.batch_size}, Adam lr {args.lr:g}, {args.seeds} seeds; loss = "
        "cross-entropy + the listed loss (weight 1) against the teacher's precomputed logits; T = 4 for every "
        "loss. Step time: median of interleaved timed rounds, one CPU thread.",
        "",
        "| method | test accuracy (mean ± std) | step time | vs student-only |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        lines.append(f"| {method} | {mean_std(acc[method])} | {step[method] * 1e3:.3f} ms | "
                     f"{step[method] / base:.2f}x |")
    lines.append("")
    lines += [f"- {m} vs student-only: {step[m] / base:.2f}x step time, "
              f"{100 * (statistics.mean(acc[m]) - statistics.mean(acc['student-only'])):+.1f} points accuracy"
              for m in METHODS if m != "student-only"]
    lines.append(f"- wall time for the whole protocol: {(time.perf_counter() - start) / 60:.1f} min")
    body = "\n".join(lines)
    print(body)
    if not args.no_report and not args.quick:
        from _report import write_section

        print(f"wrote {write_section('losses', 'Logit distillation losses on a synthetic classification task', body)}")


if __name__ == "__main__":
    main()

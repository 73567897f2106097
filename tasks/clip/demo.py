"""`xmodal demo`: the CLIP compression job end to end on the synthetic image-caption world.

Generates the data, trains (or reuses) a teacher, distils a half-size student with weight inheritance and
affinity mimicking, trains the same student from scratch with the same budget, evaluates all three on held-out
retrieval and zero-shot classification, prints a table and writes a plot of the training curves.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.commands import register_command
from xmodal.config import LossSpec, TrainConfig, apply_overrides, dump_yaml, from_dict, to_dict
from xmodal.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _teacher_cfg() -> dict:
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 4, "width": 128, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    }


@dataclass
class DemoConfig:
    """Every knob of the demo; `xmodal demo --set key=value` overrides any of them."""

    out: str = "runs/demo"
    seed: int = 0  # the world, and the students' initialisation and data order
    data_train: int = 4000
    data_val: int = 300
    data_test: int = 1000
    zeroshot_per_class: int = 10  # single-object images per colour-shape class in the zero-shot task
    teacher_cfg: dict[str, Any] = field(default_factory=_teacher_cfg)
    teacher_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=400, batch_size=64, lr=1e-3, weight_decay=0.1, warmup_steps=40, log_every=25))
    shrink: dict[str, Any] = field(default_factory=lambda: {
        "vision": {"layers": 2, "width": 0.5}, "text": {"layers": 2, "width": 0.5}})
    student_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=250, batch_size=64, lr=1e-3, weight_decay=0.1, warmup_steps=25, log_every=25, eval_every=50))
    scratch_lr: float | None = 2e-3  # the scratch student's rate (None: student_train.lr), tuned on validation
    distill_losses: list[LossSpec] = field(default_factory=lambda: [LossSpec("affinity", 1.0)])
    scratch_losses: list[LossSpec] = field(default_factory=lambda: [LossSpec("clip", 1.0)])
    eval_batch_size: int = 256
    threads: int = 0  # CPU threads for torch; 0: all cores when idle, 1 when other jobs keep them busy


def choose_threads(requested: int = 0) -> int:
    """CPU threads for the demo. 0 picks: torch's default (OMP_NUM_THREADS or one per core) when the cores are
    idle, fewer when the load average shows other jobs on them, because torch's threads then wait on each other
    for their turn and a small model trains several times slower than on one thread."""
    import torch

    from xmodal.errors import ConfigError

    if requested < 0:
        raise ConfigError(f"threads must be 0 (automatic) or a positive count, got {requested}")
    if requested:
        return requested
    default = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or default <= 1:
        return default
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return default
    idle = (os.cpu_count() or default) - busy
    return max(1, min(default, int(idle + 0.5)))


def demo_data(cfg: DemoConfig, progress: bool = True):
    """Generate (or find) the synthetic world for these settings in `out/data/<settings hash>/`, at the teacher's
    image size, and return its (DataConfig, DataPaths): a run with other data settings gets its own folder."""
    from xmodal.data.scenes import WORLD_VERSION, generate_scene_dataset
    from xmodal.fingerprint import hash_json
    from xmodal.tasks.clip.config import DataConfig
    from xmodal.tasks.clip.job import resolve_data

    size = int(cfg.teacher_cfg.get("vision_cfg", {}).get("image_size", 64))
    settings = {"train": cfg.data_train, "val": cfg.data_val, "test": cfg.data_test, "seed": cfg.seed,
                "image_size": size, "zeroshot_per_class": cfg.zeroshot_per_class, "version": WORLD_VERSION}
    root = Path(cfg.out) / "data" / hash_json(settings)[:12]
    generate_scene_dataset(root, cfg.data_train, cfg.data_val, cfg.data_test, seed=cfg.seed, image_size=size,
                           zeroshot_per_class=cfg.zeroshot_per_class, progress=progress)
    data_cfg = DataConfig(root=str(root))
    return data_cfg, resolve_data(data_cfg)


def demo_teacher(cfg: DemoConfig, paths, data_cfg, device):
    """The teacher CLIP, trained contrastively on the world's captions, or the one trained earlier with these
    settings (kept in `out/teacher/<settings hash>/`)."""
    from xmodal.tasks.clip.config import TeacherConfig
    from xmodal.tasks.clip.job import obtain_teacher

    spec = TeacherConfig(model_cfg=copy.deepcopy(cfg.teacher_cfg), train=cfg.teacher_train)
    teacher = obtain_teacher(spec, paths, data_cfg, Path(cfg.out), device)
    teacher.model.eval().requires_grad_(False)
    return teacher


def train_student(cfg: DemoConfig, kind: str, teacher, paths, data_cfg, device, seed: int, run_dir: Path,
                  lr: float | None = None):
    """One half-size student: `distilled` (weight inheritance + `distill_losses` against the teacher) or `scratch`
    (random initialisation + `scratch_losses` on the captions); same steps and batches for both."""
    import torch

    from xmodal.students.clip import shrink_model_cfg
    from xmodal.tasks.clip.config import InheritConfig
    from xmodal.tasks.clip.job import build_student, make_evaluator, train_clip

    if kind not in ("distilled", "scratch"):
        raise ValueError(f"student kind must be 'distilled' or 'scratch', got {kind!r}")
    distil = kind == "distilled"
    train = copy.deepcopy(cfg.student_train)
    train.seed = seed
    if lr is not None:
        train.lr = lr
    elif not distil and cfg.scratch_lr is not None:
        train.lr = cfg.scratch_lr
    torch.manual_seed(seed)
    student_cfg = shrink_model_cfg(teacher.model_cfg, cfg.shrink)
    student, _ = build_student(teacher, student_cfg, InheritConfig() if distil else None, device)
    train_clip(student, paths, data_cfg, train, run_dir, losses=cfg.distill_losses if distil else cfg.scratch_losses,
               teacher=teacher if distil else None, config=to_dict(cfg), device=device,
               evaluator=make_evaluator(student, paths, "val", cfg.eval_batch_size, False, device))
    return student


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@contextlib.contextmanager
def phase(text: str):
    """Print what starts now and, when it ends, how long it took (wall and this process's CPU time), so a piped
    run (`xmodal demo | tee log`) shows where it is."""
    print(text, flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    print(f"      done in {_duration(time.perf_counter() - wall)} (CPU {_duration(time.process_time() - cpu)})",
          flush=True)


@contextlib.contextmanager
def cpu_threads(requested: int = 0, device=None):
    """Run a block with `choose_threads(requested)` torch CPU threads (on CPU), then restore the previous count.
    Yields a note for the user when fewer threads than torch's default were chosen."""
    import torch

    before = torch.get_num_threads()
    if device is not None and torch.device(device).type != "cpu":
        yield ""
        return
    torch.set_num_threads(choose_threads(requested))
    note = ""
    if torch.get_num_threads() < before:
        note = (f" (other jobs keep the cores busy, so fewer than {before} threads; --set threads={before} to use "
                "them all)")
    try:
        yield note
    finally:
        torch.set_num_threads(before)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict[str, Any]:
    """Run the demo and return the results table as a dict; writes everything under `cfg.out`."""
    from xmodal.device import resolve_device

    with cpu_threads(cfg.threads, resolve_device(cfg.student_train.device)) as note:
        return _run_demo(cfg, progress, note)


def _run_demo(cfg: DemoConfig, progress: bool, note: str) -> dict[str, Any]:
    import torch

    from xmodal.device import resolve_device, seed_everything
    from xmodal.students.clip import describe_model_cfg, shrink_model_cfg
    from xmodal.tasks.clip.job import count_parameters, evaluate_clip, image_throughput

    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo.yaml", dump_yaml(cfg))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.student_train.device)
    threads = torch.get_num_threads()
    where = f"CPU, {threads} thread{'s' * (threads != 1)}" if device.type == "cpu" else str(device)
    print(f"xmodal demo on {where}{note}; settings in {out / 'demo.yaml'}", flush=True)
    with phase(f"[1/5] synthetic image-caption world: {cfg.data_train} train, {cfg.data_val} val, "
               f"{cfg.data_test} test images, {cfg.zeroshot_per_class} zero-shot images per class"):
        data_cfg, paths = demo_data(cfg, progress)
        print(f"      in {paths.train.parent}", flush=True)

    with phase(f"[2/5] teacher {describe_model_cfg(cfg.teacher_cfg)}: {cfg.teacher_train.steps} contrastive steps "
               "(reused when trained before with these settings)"):
        teacher = demo_teacher(cfg, paths, data_cfg, device)

    student_cfg = shrink_model_cfg(teacher.model_cfg, cfg.shrink)
    steps = cfg.student_train.steps
    runs = {"teacher": teacher}
    with phase(f"[3/5] distilled student {describe_model_cfg(student_cfg)}: weight inheritance + "
               f"{'+'.join(s.name for s in cfg.distill_losses)}, {steps} steps"):
        runs["distilled"] = train_student(cfg, "distilled", teacher, paths, data_cfg, device, cfg.seed,
                                          out / "distilled")
    with phase(f"[4/5] the same student from scratch: {'+'.join(s.name for s in cfg.scratch_losses)} on the "
               f"captions, {steps} steps"):
        runs["scratch"] = train_student(cfg, "scratch", teacher, paths, data_cfg, device, cfg.seed, out / "scratch")

    rows = {}
    image_size = teacher.model_cfg["vision_cfg"]["image_size"]
    with phase("[5/5] held-out evaluation: retrieval on the test split, zero-shot classification of single objects"):
        for name, m in runs.items():
            metrics = evaluate_clip(m, paths.test, paths.zeroshot, cfg.eval_batch_size, device)
            rows[name] = {
                "params": count_parameters(m.model),
                "images_per_s": image_throughput(m.model, image_size, device),
                **metrics,
            }
            zs = f", zero-shot top-1 {metrics['zeroshot_top1']:.1%}" if "zeroshot_top1" in metrics else ""
            print(f"      {name}: I→T R@1 {metrics['image_to_text_R@1']:.1%}, "
                  f"T→I R@1 {metrics['text_to_image_R@1']:.1%}{zs}", flush=True)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    results = {"rows": rows, "student": describe_model_cfg(student_cfg),
               "teacher": describe_model_cfg(teacher.model_cfg), "steps": steps,
               "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "device": where}
    atomic_write_json(out / "results.json", results)
    table = results_table(rows)
    atomic_write_text(out / "results.md", table + "\n")
    print()
    print(table)
    plot = plot_curves({"distilled": out / "distilled", "scratch": out / "scratch"}, out / "curves.png")
    print(f"\nrun folder: {out} (checkpoints, metrics.jsonl per run, results.json, results.md"
          f"{', ' + plot.name if plot else ''})")
    print(f"took {_duration(wall)} (CPU time {_duration(cpu)}; {where})", flush=True)
    return results


COLUMNS = [
    ("params", "params", "{:,.0f}"),
    ("images_per_s", "img/s", "{:,.0f}"),
    ("image_to_text_R@1", "I→T R@1", "{:.1%}"),
    ("image_to_text_R@5", "I→T R@5", "{:.1%}"),
    ("text_to_image_R@1", "T→I R@1", "{:.1%}"),
    ("text_to_image_R@5", "T→I R@5", "{:.1%}"),
    ("zeroshot_top1", "zero-shot top-1", "{:.1%}"),
]


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of the demo's models."""
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for name, r in rows.items():
        cells = [fmt.format(r[key]) if key in r else "–" for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, Path], path: Path) -> Path | None:
    """Training loss and validation T→I R@1 against steps for each run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xmodal.engine import read_metrics

    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        records = read_metrics(run / "metrics.jsonl")
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval/text_to_image_R@1" in r]
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        ax_r1.plot([r["step"] for r in evals], [r["eval/text_to_image_R@1"] for r in evals], marker="o", label=name)
    ax_loss.set(title="training loss (each run's own objective)", xlabel="step")
    ax_r1.set(title="validation text→image R@1", xlabel="step")
    for ax in (ax_loss, ax_r1):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from xmodal.io import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run folder (default runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting, e.g. --set student_train.steps=100 (see runs/demo/demo.yaml)")
    p.add_argument("--quick", action="store_true", help="a much smaller run to check the setup")


QUICK = ["data_train=400", "data_val=64", "data_test=128", "zeroshot_per_class=2", "teacher_train.steps=30",
         "student_train.steps=20", "student_train.eval_every=10", "teacher_train.log_every=10",
         "student_train.log_every=10"]


def run(args: argparse.Namespace) -> int:
    overrides = (QUICK if args.quick else []) + list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    cfg = from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), overrides), source="xmodal demo --set")
    run_demo(cfg)
    return 0


register_command("demo", "compress a CLIP model end to end on synthetic data and compare with training from scratch",
                 configure, run, description=__doc__.split("\n\n")[0])

__all__ = ["DemoConfig", "results_table", "run_demo"]

"""Prompt distillation (PromptKD) on the synthetic image world: base / novel / HM accuracy of the teacher, the student
zero-shot and the prompt-distilled student over seeds, and the training-step time with stored class vectors vs
teacher text features recomputed at every step (what PromptKD's code does).

Protocol, with the settings of examples/prompt_distill.yaml (any can be changed with --set key=value): one synthetic
world, and one teacher and one student CLIP trained on its captions once (reused across seeds and runs). Classes
are sorted by name; the first ⌈C/2⌉ are base, the rest novel. For each seed (train.seed: prompt initialisation, data
order, augmentation) the student's prompts and projector are distilled from the unlabelled training images; the
checkpoint is chosen on the single-object images of the validation split; everything is reported on the zero-shot
split, which neither training nor the choice sees. With --vary-pretraining the world's and the pretrained models'
seeds change with the seed too (slower: everything is trained again per seed).

    python benchmarks/bench_prompt_distill.py            # 3 seeds and the step-time ratio; prints the tables
    python benchmarks/bench_prompt_distill.py --quick    # a smoke run
    python benchmarks/bench_prompt_distill.py --report   # also writes its section of BENCHMARKS.md
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

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "prompt_distill.yaml"
MODELS = [("teacher", "teacher (stored W_T)"), ("student_zeroshot", "student zero-shot (own text tower)"),
          ("prompt_distilled", "student + prompts + projector (PromptKD)")]
METRICS = [("base", "base"), ("novel", "novel"), ("hm", "HM")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def seed_config(base: dict, out: Path, seed: int, vary_pretraining: bool) -> dict:
    cfg = copy.deepcopy(base)
    cfg["run_dir"] = str(out / f"seed{seed}")
    cfg.setdefault("train", {})["seed"] = seed
    if vary_pretraining:
        cfg["data"]["root"] = str(out / f"data_seed{seed}")
        cfg["data"]["synthetic"]["seed"] = seed
        cfg["pretrain_dir"] = str(out / f"pretrained_seed{seed}")
        for role in ("teacher", "student"):
            if cfg[role].get("train"):
                cfg[role]["train"]["seed"] = seed
    else:
        cfg["data"]["root"] = str(out / "data")
        cfg["pretrain_dir"] = str(out / "pretrained")
    return cfg


def run_seed(cfg: dict, out: Path, seed: int) -> dict:
    """The job for one seed (its results.json when it finished before)."""
    import yaml

    from xmodal.config import JOBS, load_job_config

    results = Path(cfg["run_dir"]) / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    path = out / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump({"job": "prompt_distill", **cfg}, sort_keys=False))
    name, job_cfg = load_job_config(path)
    return JOBS.get(name).run(job_cfg)


def class_list(n_classes: int, n_templates: int):
    """A class list of `n_classes` names of the synthetic world's kind and `n_templates` prompt templates."""
    from xmodal.tasks.prompt.classes import ClassList

    colours = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "black", "white", "brown"]
    shapes = ["circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring"]
    sizes = ["small", "large", "tiny", "huge"]
    names = [f"{s} {c} {sh}" for s in sizes for c in colours for sh in shapes][:n_classes]
    frames = ["a picture of a {}", "a photo of a {}.", "an image showing a {}", "there is a {}",
              "a drawing of a {}.", "one {} on a plain background", "a {} in the picture", "a rendering of a {}",
              "a close-up of a {}", "a simple {}"]
    return ClassList(names, frames[:n_templates], "benchmark")


def step_ratio(cfg: dict, n_classes: int, n_templates: int, steps: int) -> dict:
    """Median training-step time with W_T read from the store vs computed by the teacher's text tower each step."""
    import torch

    from xmodal.config import from_dict
    from xmodal.device import resolve_device
    from xmodal.losses import build_losses
    from xmodal.tasks.prompt.classes import compute_class_vectors
    from xmodal.tasks.prompt.config import PromptDistillConfig
    from xmodal.tasks.prompt.job import (
        build_prompted_student,
        obtain_student_clip,
        obtain_teacher_model,
        resolve_prompt_data,
    )
    from xmodal.tasks.prompt.models import PromptTeacher, teacher_logit_scale

    job_cfg = from_dict(PromptDistillConfig, cfg, source="benchmark")
    device = resolve_device(job_cfg.train.device)
    data = resolve_prompt_data(job_cfg)
    teacher = obtain_teacher_model(job_cfg, data, device)
    teacher.model.eval().requires_grad_(False)
    student_clip = obtain_student_clip(job_cfg, data, device)
    student_clip.model.eval().requires_grad_(False)
    classes = class_list(n_classes, n_templates)
    w = compute_class_vectors(teacher, classes, device).to(device)
    student = build_prompted_student(job_cfg, student_clip, w.shape[1], device)
    t_module = PromptTeacher(teacher.model.visual, w, teacher_logit_scale(teacher.model)).to(device)
    losses = build_losses([{"name": "prompt_kd"}])
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    size = student_clip.image_size
    batch = {"image": torch.randn(job_cfg.train.batch_size, 3, size, size, device=device),
             "teacher_image": torch.randn(job_cfg.train.batch_size, 3, teacher.image_size, teacher.image_size,
                                          device=device)}

    def step(recompute: bool) -> float:
        start = time.perf_counter()
        if recompute:
            vectors = compute_class_vectors(teacher, classes, device).to(device)
            student.set_class_vectors(vectors)
            t_module.class_vectors = vectors
        with torch.no_grad():
            t_out = t_module(batch)
        loss = losses(student(batch), t_out, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    student.set_class_vectors(w)
    times: dict[str, list[float]] = {"stored": [], "recomputed": []}
    for mode in ("stored", "recomputed"):
        step(mode == "recomputed")  # warm-up
    for _ in range(steps):  # interleaved, so load changes hit both alike
        for mode in ("stored", "recomputed"):
            times[mode].append(step(mode == "recomputed"))
    stored, recomputed = statistics.median(times["stored"]), statistics.median(times["recomputed"])
    return {"classes": n_classes, "templates": n_templates, "batch": job_cfg.train.batch_size,
            "stored_s": stored, "recomputed_s": recomputed, "ratio": recomputed / stored}


def main() -> None:
    import logging

    import yaml

    from xmodal.config import apply_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_prompt_distill")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--vary-pretraining", action="store_true",
                    help="also change the world's and the pretrained models' seeds with the seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of examples/prompt_distill.yaml, e.g. train.steps=200")
    ap.add_argument("--classes", type=int, default=120, help="classes of the step-time comparison")
    ap.add_argument("--templates", type=int, default=8, help="templates of the step-time comparison")
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny world, few steps, no report")
    ap.add_argument("--report", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("xmodal").setLevel(logging.INFO)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(EXAMPLE.read_text())
    base.pop("job")
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["data.synthetic.train=200", "data.synthetic.val=100", "data.synthetic.zeroshot_per_class=2",
                      "teacher.train.steps=20", "student.train.steps=10", "train.steps=10", "train.eval_every=5"]
        args.seeds, args.timing_steps = min(args.seeds, 2), 2
    base = apply_overrides(base, overrides)

    started = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        cfg = seed_config(base, out, seed, args.vary_pretraining)
        per_seed.append(run_seed(cfg, out, seed))
        r = per_seed[-1]
        print(f"seed {seed}: " + "; ".join(f"{name} HM {100 * r[name]['hm']:.1f}" for name, _ in MODELS), flush=True)
    timing = step_ratio(seed_config(base, out, 0, False), args.classes, args.templates, args.timing_steps)
    minutes = (time.perf_counter() - started) / 60

    lines = ["| model | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, label in MODELS:
        lines.append(f"| {label} | " + " | ".join(fmt([r[name][k] for r in per_seed]) for k, _ in METRICS) + " |")
    gains = [r["prompt_distilled"]["hm"] - r["student_zeroshot"]["hm"] for r in per_seed]
    spread = max(mean_std([r[name]["hm"] for r in per_seed])[1] for name in ("student_zeroshot", "prompt_distilled"))
    gain_m, gain_s = mean_std(gains)
    ahead = sum(g > 0 for g in gains)
    selected = [r["selected"]["step"] if r.get("selected") else r["step"] for r in per_seed]
    r0 = per_seed[0]
    body = "\n".join([
        f"Synthetic image world, {r0['classes']} classes ({len(r0['base_classes'])} base, "
        f"{len(r0['novel_classes'])} novel), accuracy on the zero-shot split in %, mean ± std over {args.seeds} "
        f"seeds ({'world, pretraining and distillation' if args.vary_pretraining else 'distillation'} seeds); "
        f"checkpoints chosen on validation images at steps {selected}.",
        "",
        *lines,
        "",
        f"- HM gain of the prompt-distilled student over its zero-shot self: {100 * gain_m:+.1f} ± {100 * gain_s:.1f} "
        f"points (ahead in {ahead}/{len(gains)} seeds); larger than the seed std of HM ({100 * spread:.1f}): "
        f"{'yes' if gain_m > spread else 'no'}",
        f"- stored class vectors vs recomputed teacher text features: {timing['ratio']:.2f}x "
        f"({timing['classes']} classes × {timing['templates']} templates, batch {timing['batch']}: "
        f"{1000 * timing['stored_s']:.0f} ms vs {1000 * timing['recomputed_s']:.0f} ms per training step)",
        f"- wall time: {minutes:.1f} min",
    ])
    print(body)
    (out / "summary.json").write_text(json.dumps({"seeds": per_seed, "timing": timing}, indent=2, default=str))
    if args.report and not args.quick:
        from _report import write_section

        if args.vary_pretraining:  # its own section: the fixed-pretraining table stays beside it
            write_section("prompt_distill_vary_pretraining", "Prompt distillation (PromptKD): base / novel / HM "
                          "with the world, the teacher and the student CLIP drawn anew for each seed", body)
        else:
            write_section("prompt_distill", "Prompt distillation (PromptKD): base / novel / HM on the synthetic world",
                          body)


if __name__ == "__main__":
    main()

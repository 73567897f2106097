"""Lip reading: cost of training with the teacher cache, with the teacher online, and without a teacher.

The `lipread_distill` job on one synthetic GRID corpus, three ways, same student, data order and steps:

- student-only: `ctc` + `attention_ce`, no teacher, no audio;
- online: + `libs` (frame level) + frame-wise KL, the speech teacher run on log-mels every step;
- cached: the same losses, teacher outputs read from the store `xmodal cache` writes (no audio is loaded).

Rounds alternate the three kinds so machine noise hits them alike; each figure is the median over rounds of the
job's training-loop wall time. Also reports the one-off cost of building the cache.

    python benchmarks/bench_lipread_cache.py
    python benchmarks/bench_lipread_cache.py --steps 20 --rounds 1 --no-report
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUPERVISED = [{"name": "ctc", "weight": 0.3}, {"name": "attention_ce", "weight": 0.7}]
DISTILL = [{"name": "libs", "weight": 0.1,
            "params": {"aligner": "time", "distance": "cosine", "frame_weight": 1.0, "sequence_weight": 0.0,
                       "context_weight": 0.0, "filter": "soft"}},
           {"name": "ctc_kd", "weight": 1.0, "params": {"ctc_weight": 0.0, "kl_weight": 1.0, "aligner": "time"}}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_lipread_cache")
    ap.add_argument("--speakers", type=int, default=4)
    ap.add_argument("--utterances", type=int, default=30)
    ap.add_argument("--steps", type=int, default=100, help="training steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from bench_lipread import student_model, teacher_model, train_block

    from xmodal.config import JOBS, from_dict
    from xmodal.data.grid import synthesize_grid
    from xmodal.data.vocab import CharVocab
    from xmodal.engine.cache import build_cache
    from xmodal.plugins import load_plugins
    from xmodal.tasks.lipread.config import LipreadDistillConfig
    from xmodal.tasks.lipread.job import cache_source, resolve_manifests, teacher_folder

    load_plugins()
    out = Path(args.out).resolve()
    root = out / f"data_{args.speakers}x{args.utterances}"
    corpus = synthesize_grid(root, seed=0, progress=False, speakers=args.speakers, utterances=args.utterances,
                             roi_size=32)
    stats = corpus["video_stats"]
    data = {"root": str(root), "val": None, "test": None,
            "video": {"crop_size": 28, "mean": float(stats["mean"]), "std": float(stats["std"]), "hflip_prob": 0.0},
            "audio": {"n_mels": 40}}
    vocab = CharVocab()
    teacher_train = train_block(200, 0, args.batch_size, 2e-3)
    teacher = {"model": {**teacher_model(), "vocab_size": len(vocab)}, "train": teacher_train}

    def config(kind: str, round_: int, teacher: dict | None) -> dict:
        run_dir = out / "runs" / f"{kind}_{round_}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = {"run_dir": str(run_dir), "data": data, "student": {**student_model(), "vocab_size": len(vocab)},
               "losses": SUPERVISED + ([] if teacher is None else DISTILL),
               "train": train_block(args.steps, 0, args.batch_size, 2e-3) | {"log_every": args.steps},
               "eval": {"decoder": "greedy", "batch_size": 16}}
        if teacher is not None:
            cfg["teacher"] = teacher
        return cfg

    # the teacher, trained once through the job's own path (and reused by later invocations), and the cache
    seed_cfg = from_dict(LipreadDistillConfig, {**config("teacher", 0, teacher), "run_dir": str(out / "teacher_run")},
                         source="bench_lipread_cache")
    t0 = time.perf_counter()
    source = cache_source(seed_cfg)
    teacher_seconds = time.perf_counter() - t0
    teacher_file = teacher_folder(seed_cfg.teacher, seed_cfg.data, resolve_manifests(seed_cfg.data),
                                  out / "teacher_run") / "speech_recognizer.pt"
    teachers = {"student-only": None, "online": {"path": str(teacher_file)},
                "cached": {"path": str(teacher_file), "cache": str(out / "cache")}}
    shutil.rmtree(out / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    build_cache(source.teacher, source.dataset, out / "cache", source.fingerprint, batch_size=source.batch_size,
                collate_fn=source.collate_fn, progress=False)
    cache_seconds = time.perf_counter() - t0
    n = len(source.dataset)

    job = JOBS.get("lipread_distill")
    kinds = ("student-only", "online", "cached")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(-1, args.rounds):  # round -1: a short untimed warm-up of each kind
        for kind in kinds:
            cfg = config(kind, r, teachers[kind])
            if r < 0:
                cfg["train"] = train_block(min(10, args.steps), 0, args.batch_size, 2e-3)
            res = job.run(from_dict(LipreadDistillConfig, cfg, source=f"bench_lipread_cache {kind}"))
            if r >= 0:
                times[kind].append(res["train_seconds"])
                print(f"round {r} {kind:>12}: {res['train_seconds']:.1f} s for {args.steps} steps", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    lines = [
        f"Synthetic GRID corpus, {args.speakers} speakers × {args.utterances} utterances ({n} training "
        f"utterances, 32×32 mouth crops at 25 fps, 16 kHz audio → 40 log-mels); the lip reader and the "
        f"speech teacher of `benchmarks/bench_lipread.py`; {args.steps} steps of batch {args.batch_size} per run, "
        f"fp32, {args.threads} thread(s), data loading in the training process; median of {args.rounds} "
        f"alternating rounds.",
        "",
        "| training run | seconds | per step (ms) |",
        "|---|---:|---:|",
    ]
    for k in kinds:
        lines.append(f"| {k} | {med[k]:.1f} | {1000 * med[k] / args.steps:.0f} |")
    lines += [
        "",
        f"- online teacher / student-only: {med['online'] / med['student-only']:.2f}x",
        f"- cached teacher / student-only: {med['cached'] / med['student-only']:.2f}x",
        f"- online / cached: {med['online'] / med['cached']:.2f}x",
        f"- cache build (one pass of the teacher over {n} utterances, fp16): {cache_seconds:.1f} s; teacher "
        f"training before it: {teacher_seconds:.0f} s",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        from _report import write_section

        write_section("lipread_cache", "Lip reading: teacher cache vs online teacher", body)


if __name__ == "__main__":
    main()

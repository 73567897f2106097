"""Lip reading from a speech teacher: LIBS distillation gain on the synthetic GRID corpus, held-out speakers.

Protocol: one synthetic GRID corpus with speaker-disjoint splits (the test speakers are never seen in
training) and one speech teacher, trained once and reused by every run. For each seed
the same lip reader is trained for the same steps with the same optimiser and data order:

- (a) `sup`: supervised on all transcripts (hybrid CTC + attention cross-entropy);
- (b) `libs`: (a) + LIBS distillation (the chosen levels, aligner and distance; soft teacher filtering);
- (b′) `libs_kl`: (b) + frame-wise KL to the teacher's CTC posteriors;
- (c) `sup20`: supervised on a 20% labelled subset only (per seed, 20% of each training speaker);
- (d) `distill20`: all training videos, the same 20% with transcripts, plus CTC distillation (`ctc_kd`: the
  teacher's greedy transcript as CTC target + frame-wise KL to its posteriors) and LIBS on every video;
- (e) `pseudo20`: (d) where the other 80% carry the teacher's confident transcripts as labels
  (`xmodal.data.pseudo.pseudo_label_manifest` with a `ConfidenceFilter`): supervised terms on the 20% true and
  the accepted pseudo-labels, the distillation of (d) on every video. The confidence threshold is chosen on the
  validation speaker (the lowest whose accepted transcripts keep CER ≤ `--pseudo-max-cer`, 0.03: the default
  teacher, CER 0.046 there, then keeps 35 of its 40 transcripts at CER 0.029 and drops 5 at 0.16) unless given;
  the report gives the acceptance rate and the CER of the accepted pseudo-labels against the true transcripts.

The teacher learns from its own synthetic corpus (other speakers, other sentences) by default, so no
transcript of the lip-reading corpus reaches a student through it. Loss weights are chosen on the validation
speaker with `--tune-libs` / `--tune-kl` / `--tune-kd` (`--tune-seeds` seeds, averaged); the trials are kept
in <out>/tune.json and shown in the report. The defaults are the settings chosen that way.

Scores: CER/WER of greedy CTC decoding on the test speakers (teacher: from audio; students: from video only),
mean ± std over seeds, and the distillation gains (a) − (b), (a) − (b′), (c) − (d), (c) − (e) and (a) − (e),
paired by seed.

    python benchmarks/bench_lipread.py --workers 2   # full protocol, two runs side by side; writes BENCHMARKS.md
    python benchmarks/bench_lipread.py --quick       # a smoke run of a minute or two, no report
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "sup": "(a) supervised, 100% transcripts",
    "libs": "(b) supervised + LIBS, 100% transcripts",
    "libs_kl": "(b′) supervised + LIBS + frame-wise KL, 100% transcripts",
    "sup20": "(c) supervised, 20% transcripts",
    "distill20": "(d) 20% transcripts + distillation on all videos",
    "pseudo20": "(e) 20% transcripts + teacher pseudo-labels + distillation on all videos",
}
LABELLED_ONLY = {"sup20"}  # trained on the labelled subset alone
PARTIAL_LABELS = {"distill20", "pseudo20"}  # trained on every video, transcripts on the subset only
PSEUDO_LABELLED = {"pseudo20"}  # the subset's transcripts + the teacher's accepted transcripts of the others
DISTILLED = {"libs", "libs_kl", "distill20", "pseudo20"}


# ---------------------------------------------------------------- sizes


def corpus_settings(quick: bool) -> dict:
    if quick:
        return dict(speakers=5, utterances=20, roi_size=32, test_fraction=0.2)
    return dict(speakers=10, utterances=40, roi_size=32, test_fraction=0.2)


def teacher_corpus_settings(quick: bool, speakers: int, utterances: int) -> dict:
    """The speech teacher's own training corpus (used with --teacher-data separate)."""
    if quick:
        return dict(speakers=4, utterances=15, roi_size=32)
    return dict(speakers=speakers, utterances=utterances, roi_size=32)


def teacher_model() -> dict:
    return dict(n_mels=40, dim=64, encoder="conformer", num_layers=2, num_heads=4, ffn_dim=128, conv_kernel=15,
                subsampling=4, decoder_layers=1, decoder_ffn_dim=128, dropout=0.1)


def student_model(width_mult: float = 0.25, dim: int = 128) -> dict:
    """The lip reader: ResNet trunk at `width_mult`, transformer encoder and decoder of width `dim` (FFN 2·dim)."""
    return dict(width_mult=width_mult, blocks=[1, 1, 1, 1], dim=dim, encoder="transformer", num_layers=2,
                num_heads=4, ffn_dim=2 * dim, conv_kernel=15, decoder_layers=1, decoder_ffn_dim=2 * dim, dropout=0.1)


def train_block(steps: int, seed: int, batch_size: int, lr: float) -> dict:
    return dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01, warmup_steps=max(1, steps // 10),
                log_every=max(1, steps // 10), eval_every=0, ckpt_every=0, keep_last=1, seed=seed,
                precision="fp32")


def supervised_losses() -> list[dict]:
    return [{"name": "ctc", "weight": 0.3},
            {"name": "attention_ce", "weight": 0.7, "params": {"label_smoothing": 0.1}}]


def libs_loss(weight: float, levels: tuple[float, float, float] = (1.0, 1.0, 1.0), aligner: str = "attention",
              distance: str = "squared", context_aligner: str = "attention") -> dict:
    frame, sequence, context = levels
    return {"name": "libs", "weight": weight,
            "params": {"aligner": aligner, "context_aligner": context_aligner, "distance": distance,
                       "frame_weight": frame, "sequence_weight": sequence,
                       "context_weight": context, "filter": "soft", "filter_rate": 2.0}}


def ctc_kd_loss(weight: float, ctc_weight: float = 1.0) -> dict:
    return {"name": "ctc_kd", "weight": weight,
            "params": {"ctc_weight": ctc_weight, "kl_weight": 1.0, "aligner": "time"}}


def variant_losses(variant: str, libs_weight: float, kd_weight: float,
                   levels: tuple[float, float, float] = (1.0, 1.0, 1.0), aligner: str = "attention",
                   distance: str = "squared", full_kl_weight: float = 0.0,
                   context_aligner: str = "attention") -> list[dict]:
    losses = supervised_losses()
    if variant in DISTILLED and libs_weight:
        losses.append(libs_loss(libs_weight, levels, aligner, distance, context_aligner))
    if variant == "libs_kl" and full_kl_weight:  # frame-wise KL to the teacher's posteriors; all transcripts there
        losses.append(ctc_kd_loss(full_kl_weight, ctc_weight=0.0))
    if variant in PARTIAL_LABELS and kd_weight:
        losses.append(ctc_kd_loss(kd_weight))
    return losses


# ---------------------------------------------------------------- data


def label_subsets(train_manifest: Path, fraction: float, seed: int, out: Path) -> tuple[Path, Path, int, int]:
    """Per seed, keep transcripts for `fraction` of each training speaker's utterances.

    Writes `<out>/seed<k>_labelled.jsonl` (the labelled utterances only) and `<out>/seed<k>_partial.jsonl`
    (every utterance, transcripts removed outside the subset); paths are made absolute.
    """
    import numpy as np

    from xmodal.io import atomic_write_text

    rows = [json.loads(line) for line in train_manifest.read_text().splitlines() if line.strip()]
    for r in rows:
        for key in ("video", "audio"):
            r[key] = str((train_manifest.parent / r[key]).resolve())
    by_speaker: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_speaker.setdefault(r["speaker"], []).append(i)
    rng = np.random.default_rng([seed, 20])
    keep: set[int] = set()
    for spk in sorted(by_speaker):
        idx = by_speaker[spk]
        n = max(1, round(fraction * len(idx)))
        keep.update(int(i) for i in rng.choice(idx, size=n, replace=False))
    labelled = [r for i, r in enumerate(rows) if i in keep]
    partial = [r if i in keep else {**r, "transcript": None} for i, r in enumerate(rows)]
    lab_path, part_path = out / f"seed{seed}_labelled.jsonl", out / f"seed{seed}_partial.jsonl"
    atomic_write_text(lab_path, "".join(json.dumps(r) + "\n" for r in labelled))
    atomic_write_text(part_path, "".join(json.dumps(r) + "\n" for r in partial))
    return lab_path, part_path, len(labelled), len(rows)


# ---------------------------------------------------------------- pseudo-labels


def recording(transcribe):
    """`transcribe` that also keeps every transcript it returns, in call order (the manifest's order)."""
    seen: list = []

    def wrapped(x, mask):
        out = transcribe(x, mask)
        seen.extend(out)
        return out

    return wrapped, seen


def label_errors(refs: list[str], hyps: list[str]) -> list[tuple[int, int]]:
    """(character edits, reference characters) per utterance, for CERs pooled over any subset."""
    from xmodal.tasks.lipread.metrics import edit_distance

    return [(edit_distance(list(r), list(h)), len(r)) for r, h in zip(refs, hyps)]


def pooled_cer(errors: list[tuple[int, int]]) -> float | None:
    chars = sum(n for _, n in errors)
    return sum(e for e, _ in errors) / chars if chars else None


def confidence_auroc(confidences: list[float], errors: list[tuple[int, int]]) -> float | None:
    """How well the confidence separates exact transcripts from wrong ones: the probability that an exact one
    scores higher than a wrong one (ties count half); None without both kinds."""
    right = [c for c, (e, _) in zip(confidences, errors) if e == 0]
    wrong = [c for c, (e, _) in zip(confidences, errors) if e > 0]
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def choose_threshold(confidences: list[float], errors: list[tuple[int, int]], max_cer: float) -> float:
    """The lowest confidence threshold whose accepted transcripts (confidence ≥ threshold) have a pooled CER of at
    most `max_cer`: the most labels at that quality (the highest confidence when none qualifies)."""
    if not confidences:
        raise ValueError("no transcripts to choose a threshold on")
    best = max(confidences)
    for t in sorted(set(confidences), reverse=True):
        cer = pooled_cer([e for c, e in zip(confidences, errors) if c >= t])
        if cer is not None and cer <= max_cer:
            best = t
    return best


# ---------------------------------------------------------------- reporting helpers


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def gain_text(before: list[float], after: list[float]) -> str:
    """Mean and std over seeds of the paired difference before − after (positive: distillation helps)."""
    diffs = [b - a for b, a in zip(before, after)]
    wins = sum(d > 0 for d in diffs)
    if len(diffs) == 1:
        return f"{diffs[0]:+.3f} (1 seed)"
    return f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f} (lower in {wins}/{len(diffs)} seeds)"


# ---------------------------------------------------------------- student runs


def run_student(cfg: dict) -> dict:
    """Train and score one lip reader from a plain config dict (top level, so worker processes can run it)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from xmodal.config import JOBS, from_dict
    from xmodal.plugins import load_plugins
    from xmodal.tasks.lipread.config import LipreadDistillConfig

    load_plugins()
    config = from_dict(LipreadDistillConfig, cfg, source=f"bench_lipread {cfg['run_dir']}")
    return JOBS.get("lipread_distill").run(config)


def run_students(configs: list[dict], workers: int, done=None) -> list[dict]:
    """Every config's results, in order; `workers` one-thread processes side by side (1: in this process)."""
    if workers <= 1:
        results = []
        for i, cfg in enumerate(configs):
            results.append(run_student(cfg))
            if done is not None:
                done(i, results[-1])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: list[dict | None] = [None] * len(configs)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_student, cfg): i for i, cfg in enumerate(configs)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if done is not None:
                done(i, results[i])
    return results


# ---------------------------------------------------------------- main


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _levels(text: str) -> tuple[float, float, float]:
    values = _floats(text)
    if len(values) != 3 or not any(values):
        raise argparse.ArgumentTypeError(f"expected three weights frame,sequence,context (not all 0), got {text!r}")
    return tuple(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_lipread")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1200, help="optimizer steps of every lip reader")
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--teacher-speakers", type=int, default=24, help="speakers of the teacher's own corpus")
    ap.add_argument("--teacher-utterances", type=int, default=40, help="utterances per speaker of that corpus")
    ap.add_argument("--teacher-data", choices=("separate", "own"), default="separate",
                    help="train the teacher on a separate synthetic corpus (other speakers and sentences) or, "
                         "as the lipread_distill job does, on the lip-reading corpus' training audio")
    ap.add_argument("--student-width", type=float, default=0.25, help="width multiplier of the student's trunk")
    ap.add_argument("--student-dim", type=int, default=128, help="width of the student's encoder and decoder")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--label-fraction", type=float, default=0.2)
    ap.add_argument("--libs-weight", type=float, default=0.1, help="weight of libs in (b) and (b′)")
    ap.add_argument("--libs-levels", type=_levels, default=(1.0, 0.0, 0.0), metavar="F,S,C",
                    help="weights of LIBS's frame, sequence and context levels inside the libs loss")
    ap.add_argument("--libs-aligner", default="time", choices=("attention", "time", "ctc", "rate_stack"),
                    help="how teacher states are aligned to video frames for LIBS's frame level")
    ap.add_argument("--libs-context-aligner", default="attention", choices=("attention", "identity"),
                    help="alignment of the decoder states (teacher-forced on the same transcript: identity fits)")
    ap.add_argument("--libs-distance", default="cosine", choices=("squared", "mean_squared", "cosine"),
                    help="LIBS distance: the paper's squared L2, or the scale-invariant 1 − cos")
    ap.add_argument("--full-kl-weight", type=float, default=1.0,
                    help="weight of the frame-wise KL to the teacher's CTC posteriors (ctc_kd without its CTC term) "
                         "in (b′)")
    ap.add_argument("--kd-weight", type=float, default=1.0, help="weight of ctc_kd in (d)")
    ap.add_argument("--partial-libs-weight", type=float, default=0.1, help="weight of libs in (d) and (e)")
    ap.add_argument("--pseudo-min-avg-logprob", type=float, default=None,
                    help="confidence threshold of the pseudo-labels of (e) (the teacher's mean log-probability over "
                         "its emitting CTC frames); default: chosen on the validation speaker with --pseudo-max-cer")
    ap.add_argument("--pseudo-max-cer", type=float, default=0.03,
                    help="the threshold of (e) is the lowest at which the validation speaker's accepted teacher "
                         "transcripts have at most this CER (default 0.03)")
    ap.add_argument("--pseudo-max-compression-ratio", type=float, default=2.4,
                    help="pseudo-labels more repetitive than this zlib ratio are dropped (Whisper's 2.4)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--tune-libs", type=_floats, default=[], metavar="W1,W2",
                    help="instead of the protocol: train (b) with each LIBS weight, seed 0, and score the "
                         "validation speakers (0 = no LIBS term, i.e. the supervised baseline)")
    ap.add_argument("--tune-kl", type=_floats, default=[], metavar="W1,W2",
                    help="likewise for the frame-KL weight of (b′), with --libs-weight (0 and 0: (a))")
    ap.add_argument("--tune-kd", type=_floats, default=[], metavar="W1,W2",
                    help="likewise for the ctc_kd weight of (d), with --partial-libs-weight (0 and 0: (c))")
    ap.add_argument("--tuning", default=None, metavar="JSON",
                    help="a tune.json written by --tune-libs/--tune-kd, shown in the report "
                         "(default: <out>/tune.json when present)")
    ap.add_argument("--tune-seeds", type=int, default=1, help="seeds per validation trial (scores are averaged)")
    ap.add_argument("--workers", type=int, default=1,
                    help="student runs side by side, one thread each (2 on a 2-core machine halves the wall time)")
    ap.add_argument("--quick", action="store_true", help="a tiny corpus and few steps; no report")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.quick:
        args.steps, args.teacher_steps, args.seeds, args.no_report = 20, 40, 1, True
        if args.out == ap.get_default("out"):
            args.out = "runs/bench_lipread_quick"

    import torch

    torch.set_num_threads(1)  # sized for one core; another benchmark may run on the other
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from xmodal.config import JOBS, from_dict
    from xmodal.data.grid import synthesize_grid
    from xmodal.data.vocab import CharVocab
    from xmodal.device import resolve_device, seed_everything
    from xmodal.fingerprint import model_fingerprint
    from xmodal.plugins import load_plugins
    from xmodal.tasks.lipread.config import (
        LipreadDataConfig,
        LipreadDistillConfig,
        LipreadEvalConfig,
        SpeechTeacherConfig,
    )
    from xmodal.tasks.lipread.evaluate import evaluate_lipreading
    from xmodal.tasks.lipread.job import eval_loader, obtain_teacher, resolve_manifests, teacher_folder

    load_plugins()
    JOBS.get("lipread_distill")  # fails early when the job is missing
    out = Path(args.out).resolve()
    device = resolve_device("auto")
    t_start = time.perf_counter()

    # ---- corpus
    corpus_cfg = corpus_settings(args.quick)
    root = out / "data"
    t0 = time.perf_counter()
    corpus_reused = (root / "corpus.json").is_file()
    corpus = synthesize_grid(root, seed=0, progress=False, **corpus_cfg)
    corpus_seconds = time.perf_counter() - t0
    stats = corpus["video_stats"]
    crop = corpus_cfg["roi_size"] - 4
    data = {"root": str(root), "train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl",
            "video": {"crop_size": crop, "mean": float(stats["mean"]), "std": float(stats["std"]),
                      "hflip_prob": 0.0, "time_masks": 1, "time_mask_max_frames": 5},
            "audio": {"n_mels": 40}}
    eval_block = {"decoder": "greedy", "batch_size": 16}

    # ---- teacher: trained once, frozen and reused by every distillation run
    vocab = CharVocab()
    data_cfg = from_dict(LipreadDataConfig, data, source="bench_lipread data")
    paths = resolve_manifests(data_cfg)
    t0 = time.perf_counter()
    if args.teacher_data == "separate":
        # Its own corpus (seed 1: other voices, other sentences), so no transcript of the lip-reading corpus
        # reaches the students through the teacher: the 20% setting really has 20% of the labels.
        teacher_corpus = teacher_corpus_settings(args.quick, args.teacher_speakers, args.teacher_utterances)
        teacher_root = out / f"teacher_data_{teacher_corpus['speakers']}x{teacher_corpus['utterances']}"
        synthesize_grid(teacher_root, seed=1, progress=False, **teacher_corpus)
        teacher_data_cfg = from_dict(LipreadDataConfig, {**data, "root": str(teacher_root)},
                                     source="bench_lipread teacher data")
        teacher_paths = resolve_manifests(teacher_data_cfg)
    else:
        teacher_corpus, teacher_data_cfg, teacher_paths = None, data_cfg, paths
    teacher_cfg = from_dict(SpeechTeacherConfig, {
        "model": {**teacher_model(), "vocab_size": len(vocab)},
        "train": train_block(args.teacher_steps, 0, args.batch_size, 2e-3) | {"eval_every": 0},
    }, source="bench_lipread teacher")
    teacher_dir = out / f"teacher_{args.teacher_data}_{args.teacher_steps}steps"
    seed_everything(0)  # the teacher's initialisation must not depend on what ran before in this process
    teacher_file = teacher_folder(teacher_cfg, teacher_data_cfg, teacher_paths, teacher_dir) / "speech_recognizer.pt"
    teacher_reused = teacher_file.is_file()
    teacher = obtain_teacher(teacher_cfg, teacher_data_cfg, teacher_paths, vocab, teacher_dir,
                             from_dict(LipreadEvalConfig, eval_block), device)
    teacher_seconds = time.perf_counter() - t0
    teacher_scores = {}
    for split, manifest in (("train", paths.train), ("test", paths.test)):
        loader = eval_loader(manifest, data_cfg, vocab, 16, video=False, audio=True)
        teacher_scores[split] = evaluate_lipreading(teacher, loader, vocab, "greedy", input_key="audio")
    teacher_params = sum(p.numel() for p in teacher.parameters())
    teacher_id = model_fingerprint(teacher)
    print(f"teacher: {teacher_params:,} params, test CER {teacher_scores['test']['cer']:.3f} "
          f"WER {teacher_scores['test']['wer']:.3f}; train CER {teacher_scores['train']['cer']:.3f} "
          f"({teacher_seconds:.0f} s)", flush=True)

    # ---- students
    subsets = out / "manifests"
    subsets.mkdir(parents=True, exist_ok=True)

    @functools.cache
    def seed_subsets(seed: int) -> tuple[Path, Path, int, int]:
        """The seed's labelled / partial manifests, written once and shared by every run of that seed."""
        return label_subsets(paths.train, args.label_fraction, seed, subsets)

    pseudo_teacher = None
    pseudo_threshold = {"value": args.pseudo_min_avg_logprob, "chosen": None}

    def pseudo_labels(manifest: Path, out_file: Path, threshold: float, relabel: bool = False) -> tuple[dict, list]:
        """`pseudo_label_manifest` with the frozen teacher (loaded as `xmodal data pseudo-label --kind speech`
        does); the record and every transcript the teacher gave, in manifest order."""
        nonlocal pseudo_teacher
        from xmodal.data.pseudo import ConfidenceFilter, pseudo_label_manifest
        from xmodal.models import create_teacher

        if pseudo_teacher is None:
            pseudo_teacher = create_teacher({"kind": "speech", "path": str(teacher_file)}, family="speech",
                                            vocab=vocab, device=str(device))
        transcribe, seen = recording(pseudo_teacher.transcribe)
        for stale in (out_file, out_file.with_name(out_file.name + ".json")):
            stale.unlink(missing_ok=True)  # transcripts are only seen when computed
        shutil.rmtree(out_file.with_name(out_file.name + ".cache"), ignore_errors=True)  # nor from the cache
        filt = ConfidenceFilter(threshold, args.pseudo_max_compression_ratio)
        record = pseudo_label_manifest(manifest, out_file, transcribe, audio=pseudo_teacher.audio_config,
                                       teacher=teacher_id, filt=filt, vocab=vocab, batch_size=16, relabel=relabel)
        return record, seen

    def threshold() -> float:
        """The pseudo-label threshold: given, or chosen on the validation speaker (its true transcripts)."""
        if pseudo_threshold["value"] is None:
            rows = [json.loads(x) for x in paths.val.read_text().splitlines() if x.strip()]
            _, seen = pseudo_labels(paths.val, subsets / "val_teacher.jsonl", -1e9, relabel=True)
            errors = label_errors([vocab.normalize(r["transcript"]) for r in rows],
                                  [vocab.normalize(t.text) for t in seen])
            conf = [t.avg_logprob for t in seen]
            t = choose_threshold(conf, errors, args.pseudo_max_cer)
            kept = [e for c, e in zip(conf, errors) if c >= t]
            pseudo_threshold.update(value=t, chosen={
                "threshold": t, "max_cer": args.pseudo_max_cer, "utterances": len(conf),
                "accepted": len(kept), "accepted_cer": pooled_cer(kept), "all_cer": pooled_cer(errors),
                "met": (pooled_cer(kept) or 0.0) <= args.pseudo_max_cer,
                "auroc": confidence_auroc(conf, errors)})
        return pseudo_threshold["value"]

    @functools.cache
    def seed_pseudo(seed: int) -> dict:
        """(e)'s training manifest for a seed: the partial manifest with the teacher's accepted transcripts of
        the unlabelled videos, and how good those are against the true transcripts."""
        _, part, _, _ = seed_subsets(seed)
        truth = {r["id"]: r["transcript"] for r in map(json.loads, paths.train.read_text().splitlines())}
        asked = [r["id"] for r in map(json.loads, part.read_text().splitlines()) if not r.get("transcript")]
        out_file = subsets / f"seed{seed}_pseudo.jsonl"
        record, seen = pseudo_labels(part, out_file, threshold())
        if len(seen) != len(asked):
            raise RuntimeError(f"{len(seen)} teacher transcripts for {len(asked)} unlabelled videos")
        labels = {r["id"]: r for r in map(json.loads, out_file.read_text().splitlines())}
        accepted = [i for i in asked if labels[i].get("transcript")]
        errors = dict(zip(asked, label_errors([vocab.normalize(truth[i]) for i in asked],
                                               [vocab.normalize(t.text) for t in seen])))
        stats = {"manifest": str(out_file), "threshold": threshold(), "asked": len(asked),
                 "accepted": len(accepted), "acceptance_rate": record["acceptance_rate"],
                 "counts": record["counts"], "accepted_cer": pooled_cer([errors[i] for i in accepted]),
                 "rejected_cer": pooled_cer([errors[i] for i in asked if i not in set(accepted)]),
                 "all_cer": pooled_cer(list(errors.values()))}
        print(f"seed {seed} pseudo-labels: {record['summary']}; CER accepted {stats['accepted_cer']}, rejected "
              f"{stats['rejected_cer']}, all {stats['all_cer']}", flush=True)
        return stats

    def student_config(variant: str, seed: int, libs_weight: float, kd_weight: float, kl_weight: float, *,
                       tag: str = "", val: bool = False) -> dict:
        """The job config of one lip reader from scratch in a fresh run folder (val scores when `val`)."""
        lab, part, _, _ = seed_subsets(seed)
        run_dir = out / "runs" / f"{variant}_seed{seed}{tag}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # every number comes from a fresh run
        train_manifest = (str(lab) if variant in LABELLED_ONLY else str(seed_pseudo(seed)["manifest"])
                          if variant in PSEUDO_LABELLED else str(part) if variant in PARTIAL_LABELS
                          else "train.jsonl")
        losses = variant_losses(variant, libs_weight, kd_weight, args.libs_levels, args.libs_aligner,
                                args.libs_distance, kl_weight, args.libs_context_aligner)
        distilled = len(losses) > len(supervised_losses())
        cfg = {
            "run_dir": str(run_dir),
            "data": {**data, "train": train_manifest, "val": "val.jsonl" if val else None},
            "teacher": {"path": str(teacher_file)} if distilled else None,
            "student": {**student_model(args.student_width, args.student_dim), "vocab_size": len(vocab)},
            "projection": "linear",
            "losses": losses,
            "train": train_block(args.steps, seed, args.batch_size, args.lr),
            "eval": eval_block,
        }
        from_dict(LipreadDistillConfig, cfg, source=f"bench_lipread {variant}")  # config errors surface here
        return cfg

    if args.tune_libs or args.tune_kd or args.tune_kl:
        # Loss weights are chosen on the validation speaker(s), seed 0, never on the test speakers.
        trials = [("libs" if w else "sup", w, 0.0, 0.0) for w in args.tune_libs]
        trials += [("libs_kl" if w or args.libs_weight else "sup", args.libs_weight, 0.0, w) for w in args.tune_kl]
        trials += [("distill20" if w or args.partial_libs_weight else "sup20", args.partial_libs_weight, w, 0.0)
                   for w in args.tune_kd]
        tuned = []
        levels = "-".join(f"{x:g}" for x in args.libs_levels)
        levels += f"_{args.libs_aligner}_{args.libs_context_aligner}_{args.libs_distance}"
        seeds = range(args.tune_seeds)
        configs = [student_config(variant, seed, lw, kw, klw, tag=f"_tune_libs{lw:g}_{levels}_kd{kw:g}_kl{klw:g}",
                                  val=True)
                   for variant, lw, kw, klw in trials for seed in seeds]
        results = run_students(configs, args.workers)
        for t, (variant, lw, kw, klw) in enumerate(trials):
            per_seed = results[t * len(seeds):(t + 1) * len(seeds)]
            cer = [res["train"]["eval/cer"] for res in per_seed]
            wer = [res["train"]["eval/wer"] for res in per_seed]
            r = {"variant": variant, "teacher_data": args.teacher_data, "teacher": teacher_id, "steps": args.steps,
                 "libs_weight": lw, "libs_aligner": args.libs_aligner, "libs_distance": args.libs_distance,
                 "libs_context_aligner": args.libs_context_aligner,
                 "libs_levels": args.libs_levels, "kd_weight": kw, "seeds": len(seeds),
                 "full_kl_weight": klw, "student": [args.student_width, args.student_dim],
                 "val_cer": statistics.mean(cer), "val_wer": statistics.mean(wer), "val_cer_seeds": cer}
            tuned.append(r)
            print(f"tune {variant} libs×{lw:g} levels {args.libs_levels} {args.libs_aligner} {args.libs_distance} "
                  f"kd×{kw:g} full-kl×{r['full_kl_weight']:g}: seeds {[round(c, 3) for c in cer]} "
                  f"val CER {r['val_cer']:.3f} WER {r['val_wer']:.3f}", flush=True)
        from xmodal.io import atomic_write_json

        previous = json.loads((out / "tune.json").read_text()) if (out / "tune.json").is_file() else []
        atomic_write_json(out / "tune.json", previous + tuned)
        return

    tuning_file = Path(args.tuning) if args.tuning else out / "tune.json"
    tuning = json.loads(tuning_file.read_text()) if tuning_file.is_file() else []
    tuning = [r for r in tuning if r.get("teacher_data", args.teacher_data) == args.teacher_data
              and r.get("student", [0.125, 64]) == [args.student_width, args.student_dim]]
    same_teacher = [r for r in tuning if r["variant"] not in DISTILLED or r.get("teacher") == teacher_id]
    if any(r["variant"] in DISTILLED for r in same_teacher):
        tuning = same_teacher  # trials with this very teacher; others only when there are none
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    student_params = 0
    t_students = time.perf_counter()
    plan = [(seed, variant) for seed in range(args.seeds) for variant in variants]
    _, _, n_labelled, n_train = seed_subsets(0)
    pseudo = {seed: seed_pseudo(seed) for seed in range(args.seeds)} if any(
        v in PSEUDO_LABELLED for v in variants) else {}
    configs = [student_config(variant, seed, args.partial_libs_weight if variant in PARTIAL_LABELS
                              else args.libs_weight, args.kd_weight, args.full_kl_weight) for seed, variant in plan]

    def report_run(i: int, res: dict) -> None:
        seed, variant = plan[i]
        s = res["student"]
        print(f"seed {seed} {variant:>9}: CER {s['cer']:.3f} WER {s['wer']:.3f} "
              f"({res['train_seconds']:.0f} s, final loss {res['train'].get('loss', float('nan')):.3f})", flush=True)

    for (_, variant), res in zip(plan, run_students(configs, args.workers, report_run)):
        student_params = res["student_params"]
        s = res["student"]
        rows[variant].append({"cer": s["cer"], "wer": s["wer"], "seconds": res["train_seconds"],
                              "loss": res["train"].get("loss")})
    students_seconds = time.perf_counter() - t_students
    elapsed = time.perf_counter() - t_start
    atomic_results = {"teacher": {k: {m: v[m] for m in ("cer", "wer", "num_utterances")}
                                  for k, v in teacher_scores.items()},
                      "students": rows, "args": vars(args), "corpus": corpus_cfg, "elapsed_s": elapsed,
                      "pseudo_labels": {"threshold": pseudo_threshold, "seeds": pseudo}}
    from xmodal.io import atomic_write_json

    atomic_write_json(out / "results.json", atomic_results)

    # ---- report
    splits, counts = corpus["splits"], corpus["counts"]
    tm, sm = teacher_model(), student_model(args.student_width, args.student_dim)
    step_s = statistics.mean(r["seconds"] / args.steps for v in variants for r in rows[v])
    levels = dict(zip(("frame", "sequence", "context"), args.libs_levels))
    libs_txt = " + ".join(k for k, w in levels.items() if w)
    libs_txt += " levels" if sum(1 for w in levels.values() if w) > 1 else " level"
    if args.teacher_data == "separate":
        teacher_data_txt = (f"its own synthetic corpus (seed 1: {teacher_corpus['speakers']} other speakers × "
                            f"{teacher_corpus['utterances']} other sentences; no lip-reading speaker or transcript)")
    else:
        teacher_data_txt = "the lip-reading training speakers' audio with all their transcripts"

    def pseudo_text() -> str:
        if not pseudo:
            return ""
        t = pseudo_threshold["value"]
        chosen = pseudo_threshold["chosen"]
        how = (f"the lowest at which the validation speaker's accepted teacher transcripts keep CER ≤ "
               f"{args.pseudo_max_cer:g}" if chosen else "given")
        if chosen and not chosen["met"]:
            how += " (none does: its most confident transcript's)"
        return (f"(e) trains as (d) on the same videos, but the {n_train - n_labelled} videos without a transcript "
                f"get the teacher's greedy transcript from their audio as their label when it is confident "
                f"(`xmodal.data.pseudo.pseudo_label_manifest`: mean log-probability of the best CTC path over its "
                f"emitting frames ≥ {t:.3f}, {how}; zlib compression ratio ≤ "
                f"{args.pseudo_max_compression_ratio:g}), with (d)'s distillation terms and weights. ")

    def pseudo_details() -> str:
        per = [pseudo[s] for s in sorted(pseudo)]
        acc = [100 * p["acceptance_rate"] for p in per]
        cer_acc = [p["accepted_cer"] for p in per if p["accepted_cer"] is not None]
        cer_rej = [p["rejected_cer"] for p in per if p["rejected_cer"] is not None]
        cer_all = [p["all_cer"] for p in per]
        text = (f"- (e) pseudo-labels on the training videos without a transcript: accepted "
                f"{'/'.join(str(p['accepted']) for p in per)} of {per[0]['asked']} per seed "
                f"({mean_std(acc)}%); CER of the accepted pseudo-labels against the true transcripts "
                f"{mean_std(cer_acc) if cer_acc else 'n/a'}, of the rejected ones "
                f"{mean_std(cer_rej) if cer_rej else 'n/a (none rejected)'}, of all the teacher's transcripts "
                f"{mean_std(cer_all)}")
        chosen = pseudo_threshold["chosen"]
        if chosen:
            auroc = chosen["auroc"]
            text += (f". On the validation speaker ({chosen['utterances']} utterances, teacher CER "
                     f"{chosen['all_cer']:.3f}) the threshold {chosen['threshold']:.3f} accepts "
                     f"{chosen['accepted']} with CER {chosen['accepted_cer']:.3f}; the confidence ranks an exact "
                     f"transcript above a wrong one with probability "
                     f"{'n/a (all exact or all wrong)' if auroc is None else f'{auroc:.2f}'} (AUROC)")
        return text

    d_terms = [f"`ctc_kd` × {args.kd_weight:g}"] if args.kd_weight else []
    d_terms += [f"`libs` × {args.partial_libs_weight:g}"] if args.partial_libs_weight else []
    lines = [
        f"Synthetic GRID corpus (eSpeak NG speech + rendered mouth video; not the real GRID): "
        f"{corpus_cfg['speakers']} speakers × {corpus_cfg['utterances']} utterances, {corpus['hours'] * 60:.1f} "
        f"min of speech, {corpus_cfg['roi_size']}×{corpus_cfg['roi_size']} mouth crops at 25 fps. "
        f"Speaker-disjoint splits: train {len(splits['train'])} speakers ({counts['train']} utterances), "
        f"validation {len(splits['val'])} ({counts['val']}), test {len(splits['test'])} held-out speakers "
        f"({counts['test']} utterances).",
        "",
        f"Teacher: {teacher_params:,}-parameter Conformer CTC/attention speech recogniser on 40 log-mel bands "
        f"(dim {tm['dim']}, {tm['num_layers']} layers), trained once for {args.teacher_steps} steps of batch "
        f"{args.batch_size} on {teacher_data_txt}, then frozen and shared by every distillation run. Its greedy "
        f"CER on the lip reader's training speakers (the quality of what it teaches): "
        f"{teacher_scores['train']['cer']:.3f}. Student: {student_params:,}-parameter lip reader (3D conv + "
        f"ResNet trunk at width ×{sm['width_mult']}, {sm['encoder']} encoder dim {sm['dim']} × "
        f"{sm['num_layers']} layers, CTC head + 1-layer attention decoder) on {crop}×{crop} random crops "
        f"(centre crops at test).",
        "",
        f"Every student: {args.steps} AdamW steps of batch {args.batch_size}, lr {args.lr:g} (warmup + cosine), "
        f"fp32, `torch.set_num_threads(1)`; the seed sets initialisation, data order and the labelled subset; "
        f"nothing else differs between (a)–(e). Supervised terms: 0.3·`ctc` + 0.7·`attention_ce`. "
        f"(b) adds `libs` × {args.libs_weight:g} ({libs_txt}, {args.libs_aligner} frame aligner, "
        f"{args.libs_context_aligner} context aligner, "
        f"{args.libs_distance} distance, soft teacher filtering exp(−2·CER))"
        f"; (b′) adds to (b) the frame-wise KL to the teacher's posteriors (`ctc_kd` without its CTC term) × "
        f"{args.full_kl_weight:g}. Partial labels: {n_labelled} of {n_train} training utterances keep their transcript "
        f"({args.label_fraction:.0%} of each speaker); (c) trains on those alone, (d) on all {n_train} videos "
        f"with {' and '.join(d_terms) or 'no distillation term'} (`ctc_kd`: the teacher's greedy transcript as "
        f"CTC target + frame-wise KL to its posteriors); `ctc` / `attention_ce` skip the unlabelled ones. "
        f"{pseudo_text()}"
        f"Scores: greedy CTC decoding (best path), {args.seeds} seeds, mean ± std.",
        "",
        "| model (held-out test speakers) | input | CER | WER |",
        "|---|---|---:|---:|",
        f"| teacher | audio | {teacher_scores['test']['cer']:.3f} | {teacher_scores['test']['wer']:.3f} |",
    ]
    for v in variants:
        lines.append(f"| {VARIANTS[v]} | video | {mean_std([r['cer'] for r in rows[v]])} | "
                     f"{mean_std([r['wer'] for r in rows[v]])} |")
    lines.append("")

    def col(v: str, key: str) -> list[float]:
        return [r[key] for r in rows[v]]

    def used(r: dict) -> bool:
        """Whether a validation trial ran the settings of this protocol."""
        levels_used = (tuple(r.get("libs_levels") or (1.0, 1.0, 1.0)) == tuple(args.libs_levels)
                       and r.get("libs_aligner", "attention") == args.libs_aligner
                       and r.get("libs_distance", "squared") == args.libs_distance
                       and r.get("libs_context_aligner", "attention") == args.libs_context_aligner)
        if r["variant"] == "libs":
            return r["libs_weight"] == args.libs_weight and levels_used
        if r["variant"] == "libs_kl":
            return (r["libs_weight"] == args.libs_weight and levels_used
                    and r.get("full_kl_weight", 0.0) == args.full_kl_weight)
        if r["variant"] == "distill20":
            return (r["libs_weight"] == args.partial_libs_weight and r["kd_weight"] == args.kd_weight
                    and (levels_used or not r["libs_weight"]))
        return r["variant"] in ("sup", "sup20")

    for base, dist, label in (("sup", "libs", "(a) − (b), LIBS with all transcripts"),
                              ("sup", "libs_kl", "(a) − (b′), LIBS + frame-wise KL with all transcripts"),
                              ("sup20", "distill20", "(c) − (d), distillation with 20% transcripts"),
                              ("sup20", "pseudo20", "(c) − (e), pseudo-labels + distillation with 20% transcripts"),
                              ("distill20", "pseudo20", "(d) − (e), what the pseudo-labels add to distillation"),
                              ("sup", "pseudo20", "(a) − (e), 20% transcripts + pseudo-labels against all "
                                                  "transcripts")):
        if base in rows and dist in rows:
            gain = statistics.mean(col(base, "cer")) - statistics.mean(col(dist, "cer"))
            verdict = "" if gain > 0 else " — **distillation did not lower the student's CER here**"
            if dist == "pseudo20" and base != "sup20" and gain <= 0:
                verdict = f" — (e) does not beat {VARIANTS[base][:3]}"
            lines.append(f"- gain {label}: CER {gain_text(col(base, 'cer'), col(dist, 'cer'))}; "
                         f"WER {gain_text(col(base, 'wer'), col(dist, 'wer'))}{verdict}")
    if pseudo:
        lines.append(pseudo_details())
    if tuning:
        order = list(VARIANTS)
        tuning = sorted(tuning, key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
        steps = sorted({r.get("steps", args.steps) for r in tuning})
        lines += ["", f"Loss weights were chosen on the validation speaker ({counts['val']} utterances; the mean over "
                  f"seeds 0…k−1 for k seeds; {'/'.join(map(str, steps))} steps, otherwise as above), never on the "
                  "test speakers (`--tune-libs` / `--tune-kl` / `--tune-kd`; ← marks the settings used above):", "",
                  "| run (validation speaker) | libs weight (frame, sequence, context), frame/context aligner, "
                  "distance | ctc_kd weight | seeds | CER | WER |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in tuning:
            lv = ", ".join(f"{x:g}" for x in r.get("libs_levels") or (1, 1, 1))
            libs = (f"{r['libs_weight']:g} ({lv}), {r.get('libs_aligner', 'attention')}"
                    f"/{r.get('libs_context_aligner', 'attention')}, "
                    f"{r.get('libs_distance', 'squared')}" if r["libs_weight"] else "–")
            if r.get("full_kl_weight"):
                libs += f"; frame KL × {r['full_kl_weight']:g}"
            kd = f"{r['kd_weight']:g}" if r["variant"] in PARTIAL_LABELS and r["kd_weight"] else "–"
            lines.append(f"| {VARIANTS.get(r['variant'], r['variant'])}{' ←' if used(r) else ''} | {libs} | {kd} | "
                         f"{r.get('seeds', 1)} | {r['val_cer']:.3f} | {r['val_wer']:.3f} |")
        lines.append("")
        if any(r.get("teacher") != teacher_id for r in tuning if r["variant"] in DISTILLED):
            lines.append("- the sweep's distillation runs used another training run of the same teacher recipe "
                         "(another initialisation, so a somewhat different teacher); the weights were not "
                         "re-tuned for this one")
        for v in ("libs", "libs_kl", "distill20"):
            trials = [r for r in tuning if r["variant"] == v]
            if v in variants and not trials:
                lines.append(f"- {VARIANTS[v]}: no validation trial with this student and teacher; its weights are "
                             "the script's defaults, not tuned for it")
            best = min(trials, key=lambda r: r["val_cer"], default=None)
            chosen = next((r for r in trials if used(r)), None)
            if best is not None and chosen is not None and best["val_cer"] < chosen["val_cer"]:
                lines.append(f"- {VARIANTS[v]}: the settings used have validation CER {chosen['val_cer']:.3f}, "
                             f"the best in the sweep {best['val_cer']:.3f}")
    lines += [
        "",
        f"Wall time: {elapsed / 60:.1f} min in all (corpus {corpus_seconds:.0f} s"
        f"{' (reused from an earlier run)' if corpus_reused else ''}, teacher corpus + training "
        f"{teacher_seconds:.0f} s{' (reused from an earlier run)' if teacher_reused else ''}, "
        f"{len(variants) * args.seeds} student runs {students_seconds / 60:.1f} min with {args.workers} "
        f"side by side, "
        f"about {step_s:.2f} s per training step with data loading).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_report:
        from _report import write_section

        # the default budget has its own section; other budgets get theirs, so one never overwrites the other
        key, title = "lipread", "Lip reading from a speech teacher: LIBS distillation on synthetic GRID"
        if args.steps != ap.get_default("steps"):
            key, title = f"{key}_{args.steps}steps", f"{title}, {args.steps} steps per student"
        if (args.student_width, args.student_dim) != (ap.get_default("student_width"), ap.get_default("student_dim")):
            key += f"_student{args.student_width:g}x{args.student_dim}"
            title += f", student trunk ×{args.student_width:g} and width {args.student_dim}"
        write_section(key, title, body)


if __name__ == "__main__":
    main()

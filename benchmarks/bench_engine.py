"""Training-step cost of distillation with a teacher cache, with an online teacher, and without a teacher.

One run, one student architecture, one data set: three copies of the same small open_clip student train side
by side, a step of each kind in turn (so machine noise hits all three alike):

- student-only: the student's own CLIP contrastive loss, no teacher;
- cached: affinity mimicking against teacher embeddings read from a `TeacherCache` (fp16 memmaps);
- online: affinity mimicking against the teacher run under inference mode on every step.

Models are tiny but shaped like CLIP (teacher ViT width 256 × 6 layers, student 128 × 4, 64 px images,
32-token text). Data are random tensors with string ids. Also reports the cache build rate and lookup cost.

    python benchmarks/bench_engine.py
    python benchmarks/bench_engine.py --batch-size 64 --rounds 40 --no-report
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IMAGE, CONTEXT, VOCAB = 64, 32, 49408


def clip_model(embed: int, width: int, layers: int, text_width: int, text_layers: int):
    import open_clip

    return open_clip.model.CLIP(
        embed_dim=embed,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=layers, width=width, head_width=64, patch_size=8,
                                                 image_size=IMAGE),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=text_width,
                                             heads=max(1, text_width // 64), layers=text_layers),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=512, help="data set size (cached once)")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per kind first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-report", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()

    import torch
    from torch import nn

    if args.threads:
        torch.set_num_threads(args.threads)

    from xmodal.adapters import ImageAdapter, TextAdapter
    from xmodal.config import TrainConfig
    from xmodal.engine import Objective, TeacherCache, build_cache, build_optimizer, train_step
    from xmodal.fingerprint import model_fingerprint
    from xmodal.losses import build_losses

    torch.manual_seed(0)
    device = torch.device("cpu")

    class Towers(nn.Module):
        """Image + text adapters over one open_clip model: batch → {"image", "text"} Features."""

        def __init__(self, model: nn.Module, frozen: bool = False):
            super().__init__()
            self.image = ImageAdapter(model, frozen=frozen)
            self.text = TextAdapter(model, frozen=frozen)

        def forward(self, batch):
            return {"image": self.image(batch), "text": self.text(batch)}

    class RandomPairs(torch.utils.data.Dataset):
        def __init__(self, n: int):
            g = torch.Generator().manual_seed(0)
            self.images = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
            self.texts = torch.randint(1, VOCAB, (n, CONTEXT), generator=g)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return {"id": f"sample-{i:06d}", "image": self.images[i], "text": self.texts[i]}

    teacher_model = clip_model(256, 256, 6, 256, 6).eval()
    teacher = Towers(teacher_model, frozen=True).eval()
    student_model = clip_model(128, 128, 4, 128, 4)
    data = RandomPairs(args.samples)
    fingerprint = model_fingerprint(teacher_model, extra={"image_size": IMAGE, "context": CONTEXT})
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6

    with tempfile.TemporaryDirectory(prefix="xmodal-bench-engine-") as tmp:
        start = time.perf_counter()
        build_cache(teacher, data, Path(tmp) / "cache", fingerprint, batch_size=64, shard_size=256,
                    progress=False)
        build_s = time.perf_counter() - start
        cache = TeacherCache(Path(tmp) / "cache", fingerprint=fingerprint)
        cache_bytes = sum(p.stat().st_size for p in (Path(tmp) / "cache").rglob("*") if p.is_file())

        cfg = TrainConfig(lr=1e-4, weight_decay=0.1, clip_grad_norm=1.0, device="cpu")
        kinds = {
            "student-only": (["clip"], None),
            "cached": (["affinity"], cache),
            "online": (["affinity"], teacher),
        }
        runs = {}
        for name, (loss_names, source) in kinds.items():
            student = Towers(copy.deepcopy(student_model)).train()
            objective = Objective(student, build_losses([{"name": n} for n in loss_names]))
            runs[name] = (objective, build_optimizer([objective], cfg), source)

        batches = []
        g = torch.Generator().manual_seed(1)
        from xmodal.engine import collate_samples

        for _ in range(args.warmup + args.rounds):
            idx = torch.randperm(len(data), generator=g)[: args.batch_size].tolist()
            batches.append(collate_samples([data[i] for i in idx]))

        times: dict[str, list[float]] = {name: [] for name in runs}
        lookup_ms: list[float] = []
        for r, batch in enumerate(batches):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                objective, optimizer, source = runs[name]
                start = time.perf_counter()
                train_step(objective, optimizer, source, batch, device, clip_grad_norm=cfg.clip_grad_norm)
                if r >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            cache(batch)
            if r >= args.warmup:
                lookup_ms.append((time.perf_counter() - start) * 1000)

    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["student-only"]
    rows = "\n".join(
        f"| {label} | {med[name]:.1f} | {statistics.mean(times[name]):.1f} | {med[name] / base:.2f}x |"
        for name, label in [("student-only", "student only (CLIP loss, no teacher)"),
                            ("cached", "distillation, teacher cache (affinity)"),
                            ("online", "distillation, online teacher (affinity)")]
    )
    ratio_cached, ratio_online = med["cached"] / base, med["online"] / base
    target = "met" if ratio_cached <= 1.10 else "NOT met"
    body = f"""
Teacher: open_clip ViT width 256 × 6 layers + text width 256 × 6 layers ({n_params(teacher_model):.1f} M params).
Student: ViT width 128 × 4 + text width 128 × 4 ({n_params(student_model):.1f} M params). Images {IMAGE} px,
patch 8, text context {CONTEXT}; batch {args.batch_size}; AdamW + grad clipping; {args.rounds} timed steps of
each kind, interleaved (order alternating), after {args.warmup} warm-up steps; {torch.get_num_threads()} torch threads.

| step | median ms/step | mean ms/step | vs student-only |
|---|---:|---:|---:|
{rows}

- cached / student-only: {ratio_cached:.2f}x (target ≤ 1.10x: {target})
- online / student-only: {ratio_online:.2f}x
- cached over online: {med["online"] / med["cached"]:.2f}x faster per step
- cache lookup alone: {statistics.median(lookup_ms):.2f} ms per batch of {args.batch_size} (median)
- cache build: {args.samples} samples in {build_s:.1f} s ({args.samples / build_s:.0f} samples/s with the teacher),
  {cache_bytes / 2**20:.2f} MiB on disk (fp16 pooled image + text embeddings)
"""
    print(body)
    if not args.no_report:
        from _report import write_section

        path = write_section("engine", "Training engine: cached vs online distillation step", body,
                             "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:]))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

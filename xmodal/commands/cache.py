"""`xmodal cache CONFIG`: run a job's teacher once over its data set and store the outputs for distillation."""

from __future__ import annotations

import argparse
import json
import os

from xmodal.commands import register_command
from xmodal.commands.config import add_config_args


def configure(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--out", default=None, help="cache folder (default: the job's teacher_cache setting)")
    p.add_argument("--shard-size", type=int, default=4096, help="samples per shard (default 4096)")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch size (default: the job's)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage precision of float outputs (default float16)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from xmodal.config import load_job_config
    from xmodal.engine.cache import CACHE_SOURCES, as_cache_source, build_cache
    from xmodal.errors import ConfigError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`xmodal cache` runs in one process; start it without torchrun (it resumes if stopped)")
    job, cfg = load_job_config(args.config, args.overrides)
    if job not in CACHE_SOURCES:
        have = ", ".join(CACHE_SOURCES.names()) or "none"
        raise ConfigError(
            f"{args.config}: job '{job}' has no teacher cache source, so its teacher cannot be cached; "
            f"jobs that support `xmodal cache`: {have}"
        )
    source = as_cache_source(CACHE_SOURCES.get(job)(cfg))
    out = args.out or source.out_dir or getattr(cfg, "teacher_cache", None)
    if not out:
        raise ConfigError(f"{args.config}: no output folder; pass --out DIR or set teacher_cache in the config")
    path = build_cache(
        source.teacher, source.dataset, out, source.fingerprint,
        batch_size=args.batch_size or source.batch_size, shard_size=args.shard_size, dtype=args.dtype,
        collate_fn=source.collate_fn, num_workers=args.num_workers, device=args.device,
        meta={"job": job, "config": str(args.config), **(source.meta or {})}, data=source.data,
        progress=not args.no_progress,
    )
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    rows = sum(e["rows"] for e in manifest["shards"])
    skipped = manifest.get("skipped", [])
    note = f"; {len(skipped)} unreadable sample(s) skipped, their ids are in manifest.json" if skipped else ""
    print(f"teacher cache ready: {path} ({rows} samples{note})")
    return 0


register_command(
    "cache", "run a teacher once over a data set and store its outputs for distillation", configure, run,
    description="Run the job's teacher over its training data once and store pooled features, token sequences "
    "and logits in sharded memory-mapped files; an interrupted build resumes where it stopped. Samples the data "
    "set cannot read (on_error: skip) are left out and listed in the manifest. One build per folder at a time.",
)

"""`xmodal cache CONFIG`: run a job's teacher once over its data set and store the outputs for distillation.

Under `torchrun --nproc_per_node N -m xmodal cache CONFIG` every process builds its share of the shards and
rank 0 merges them into one manifest: the same cache one process builds.
"""

from __future__ import annotations

import argparse
import json

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


def describe_storage(storage: dict) -> str:
    """One line on the bytes a cache takes per sample (per view, and per image over its views)."""
    line = f"{storage['bytes_per_sample_per_view']:.1f} bytes per sample per view"
    if storage.get("views", 1) > 1:
        line += f", {storage['bytes_per_sample']:.1f} per sample over its {storage['views']} views"
    return f"{line} ({storage['bytes'] / 2**20:.2f} MiB in all)"


def run(args: argparse.Namespace) -> int:
    from xmodal.config import load_job_config
    from xmodal.distributed import is_main_process, world_size
    from xmodal.engine.cache import CACHE_SOURCES, as_cache_source, build_cache
    from xmodal.engine.ddp import env_world_size, init_distributed
    from xmodal.errors import ConfigError

    if env_world_size() > 1:
        init_distributed(args.device)  # the ranks share the shards; rank 0 merges the manifest
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
        views=source.views, progress=not args.no_progress,
    )
    if not is_main_process():
        return 0
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    rows = sum(e["rows"] for e in manifest["shards"])
    skipped = manifest.get("skipped", [])
    note = f"; {len(skipped)} unreadable sample(s) skipped, their ids are in manifest.json" if skipped else ""
    procs = f", built by {world_size()} processes" if world_size() > 1 else ""
    views = manifest["plan"].get("views")
    what = f"{rows} rows: {rows // views['count']} samples × {views['count']} views" if views else f"{rows} samples"
    print(f"teacher cache ready: {path} ({what}{note}{procs})")
    if "storage" in manifest:
        print(f"storage: {describe_storage(manifest['storage'])}")
    return 0


register_command(
    "cache", "run a teacher once over a data set and store its outputs for distillation", configure, run,
    description="Run the job's teacher over its training data once and store pooled features, token sequences "
    "and logits in sharded memory-mapped files; an interrupted build resumes where it stopped. Samples the data "
    "set cannot read (on_error: skip) are left out and listed in the manifest. One build per folder at a time. "
    "Under torchrun the processes share the shards and rank 0 merges one manifest. With augmented views (e.g. "
    "teacher.cache_views in the CLIP job) each view's parameters are stored with its outputs for replay.",
)

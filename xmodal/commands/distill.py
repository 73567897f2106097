"""`xmodal distill CONFIG`: run the job named by the config's `job:` key.

The job's run folder is locked for the whole job (before any data or model is loaded), so a second `distill`
into the same folder is refused at once, naming the process that holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from xmodal.commands import register_command
from xmodal.commands.config import add_config_args
from xmodal.config import JOBS, load_job_config


def configure(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the newest intact checkpoint of the run (or from CKPT); an error when there "
                   "is none. train.lr, warmup_steps, clip_grad_norm and precision may change on resume")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    name, cfg = load_job_config(args.config, overrides)
    with _run_folder_held(getattr(cfg, "run_dir", None)):
        JOBS.get(name).run(cfg)
    return 0


def _run_folder_held(run_dir) -> contextlib.AbstractContextManager:
    """The run folder's lock for the job (the first process of a torchrun launch holds it for all)."""
    if run_dir is None or int(os.environ.get("RANK", "0") or 0) != 0:
        return contextlib.nullcontext()
    from xmodal.engine.run import run_folder_lock

    return run_folder_lock(run_dir)


register_command(
    "distill", "run a distillation job from a YAML config", configure, run,
    description="Run a distillation job. The config's `job:` key selects it; see `xmodal config show`.",
)

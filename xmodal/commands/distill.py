"""`xmodal distill CONFIG`: run the job named by the config's `job:` key."""

from __future__ import annotations

import argparse

from xmodal.commands import register_command
from xmodal.commands.config import add_config_args
from xmodal.config import JOBS, load_job_config


def configure(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the latest checkpoint of the run (or from CKPT)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    name, cfg = load_job_config(args.config, overrides)
    JOBS.get(name).run(cfg)
    return 0


register_command(
    "distill", "run a distillation job from a YAML config", configure, run,
    description="Run a distillation job. The config's `job:` key selects it; see `xmodal config show`.",
)

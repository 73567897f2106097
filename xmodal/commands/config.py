"""`xmodal config show FILE`: print a job config fully resolved (defaults filled, overrides applied)."""

from __future__ import annotations

import argparse

from xmodal.commands import register_command
from xmodal.config import dump_yaml, load_job_config


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="job YAML file (see examples/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable; values are YAML)",
    )


def run_show(args: argparse.Namespace) -> int:
    job, cfg = load_job_config(args.config, args.overrides)
    print(f"job: {job}")
    print(dump_yaml(cfg), end="")
    return 0


register_command("config show", "print a job config with defaults and overrides resolved", add_config_args, run_show)

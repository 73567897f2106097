"""Commands whose implementation lands in a plugin; until one registers, they say so and exit non-zero."""

from __future__ import annotations

import argparse
import sys

from xmodal.cli import COMMANDS, register_command

PENDING = {
    "demo": "run the main job end to end on synthetic data (CLIP compression)",
    "cache": "run a teacher once over a data set and store its outputs for distillation",
    "export": "export a distilled student (e.g. to an open_clip checkpoint)",
}


def _not_built(name: str):
    def run(args: argparse.Namespace) -> int:
        print(f"error: `xmodal {name}` is not built in this version of xmodal yet", file=sys.stderr)
        return 2

    return run


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def register_pending() -> None:
    for name, help_text in PENDING.items():
        if name not in COMMANDS:
            register_command(name, f"{help_text} [not built yet]", _configure, _not_built(name))

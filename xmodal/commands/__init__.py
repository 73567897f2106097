"""The command registry and the core subcommands: every module here registers itself with `register_command`.

Plugins (tasks, teachers, students) register theirs the same way; `xmodal.cli` builds the parser from the registry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from xmodal.registry import Registry


@dataclass(frozen=True)
class Command:
    """A subcommand: `configure(parser)` adds arguments, `run(args)` does the work and returns an exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


COMMANDS: Registry[Command] = Registry("command")

GROUPS = {
    "eval": "evaluate a model: retrieval, zero-shot classification, lip reading",
    "data": "generate synthetic data sets and inspect data",
    "config": "inspect configuration files",
}


def register_command(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    description: str = "",
    *,
    override: bool = False,
) -> Command:
    """Register `xmodal NAME`; a two-word name ("eval retrieval") puts it in a group."""
    cmd = Command(name, help, configure, run, description or help)
    COMMANDS.register(name, cmd, override=override)
    return cmd

"""`xmodal` command line: subcommands come from a registry that core modules and plugins fill."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from xmodal.commands import COMMANDS, GROUPS, Command, register_command
from xmodal.errors import XmodalError

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register_command"]


def build_parser() -> argparse.ArgumentParser:
    from xmodal import __version__
    from xmodal.plugins import load_plugins

    load_plugins()
    parser = argparse.ArgumentParser(
        prog="xmodal",
        description="Cross-modal knowledge distillation: compress CLIP models, train lip readers from speech "
        "teachers, evaluate retrieval at scale.",
    )
    parser.add_argument("--version", action="version", version=f"xmodal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name in COMMANDS.names():
        cmd = COMMANDS.get(name)
        words = name.split(" ")
        if len(words) == 1:
            p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        else:
            group, leaf = words
            if group not in groups:
                gp = sub.add_parser(group, help=GROUPS.get(group, f"{group} commands"))
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
                gp.set_defaults(_group_parser=gp)
            p = groups[group].add_parser(leaf, help=cmd.help, description=cmd.description)
        cmd.configure(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own progress at INFO; libraries (open_clip logs every model build to the root logger) at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("xmodal").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    try:
        return int(cmd.run(args) or 0)
    except XmodalError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`xmodal losses [PATTERN]`: every registered loss with its formula line, parameters and defaults, the view it
compares and the Features fields (and batch keys) it reads, filtered by a glob pattern on the name."""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import json
import sys
from typing import Any

from xmodal.commands import register_command


def first_line(doc: str | None) -> str:
    """The docstring's first sentence block (up to the first blank line), on one line."""
    lines = []
    for line in inspect.cleandoc(doc or "").splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)


def parameters(cls: type) -> list[dict[str, Any]]:
    """Constructor parameters: name, default (or required) and annotation. A loss class may name parameters that
    have no usable default in `required_params` (with example values used only to list what it needs)."""
    required = getattr(cls, "required_params", {}) or {}
    out = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        entry: dict[str, Any] = {"name": name}
        if p.default is p.empty or name in required:
            entry["required"] = True
        else:
            entry["default"] = list(p.default) if isinstance(p.default, tuple) else p.default
        if p.annotation is not p.empty:
            entry["type"] = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        out.append(entry)
    return out


def describe(name: str) -> dict[str, Any]:
    """What `xmodal losses` shows for one registered loss."""
    from xmodal.errors import XmodalError
    from xmodal.losses import LOSSES

    cls = LOSSES.get(name)
    info: dict[str, Any] = {
        "name": name,
        "summary": first_line(cls.__doc__),
        "view": getattr(cls, "view", "native"),
        "params": parameters(cls),
    }
    try:
        loss = cls(**(getattr(cls, "required_params", {}) or {}))
    except (XmodalError, TypeError, ValueError) as e:  # a parameter without a usable default
        info["needs"] = None
        info["needs_note"] = f"depends on required parameters ({e})"
        return info
    needs = loss.needs()
    info["needs"] = None if needs is None else [
        {"role": n.role, "modality": n.modality, "field": n.field} for n in needs
    ]
    if needs is None:
        info["needs_note"] = "not declared (checked when called)"
    keys = getattr(loss, "batch_keys", None)
    info["batch_keys"] = list(keys()) if callable(keys) else []
    return info


def format_entry(info: dict[str, Any]) -> str:
    def value(p: dict) -> str:
        return f"{p['name']} (required)" if p.get("required") else f"{p['name']}={p['default']!r}"

    lines = [f"{info['name']}: {info['summary']}" if info["summary"] else info["name"], f"    view: {info['view']}"]
    if info.get("needs") is not None:
        by_role: dict[str, list[str]] = {}
        for n in info["needs"]:
            by_role.setdefault(n["role"], []).append(f"{n['modality']}.{n['field']}")
        needs = "; ".join(f"{role} {', '.join(fields)}" for role, fields in by_role.items()) or "nothing"
    else:
        needs = info.get("needs_note", "not declared")
    lines.append(f"    needs: {needs} (with the default parameters)" if info.get("needs") else f"    needs: {needs}")
    if info.get("batch_keys"):
        lines.append(f"    batch: {', '.join(info['batch_keys'])}")
    lines.append(f"    params: {', '.join(value(p) for p in info['params']) or 'none'}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from xmodal.losses import LOSSES

    names = [n for n in LOSSES.names() if fnmatch.fnmatchcase(n, args.pattern)]
    if not names:
        print(f"no registered loss matches '{args.pattern}'; known: {', '.join(LOSSES.names())}", file=sys.stderr)
        return 1
    infos = [describe(n) for n in names]
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
    else:
        print("\n\n".join(format_entry(i) for i in infos))
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="glob on the loss name, e.g. 'rkd*' (default: all)")
    p.add_argument("--json", action="store_true", help="print as JSON")


register_command(
    "losses",
    "list the registered losses: formula, parameters and defaults, and the Features fields each reads",
    configure,
    run,
    description="List every registered loss with its one-line formula, its parameters and their defaults, the view "
    "it compares (native or projected) and the Features fields and batch keys it reads, e.g. `xmodal losses "
    "'rkd*'`. Use the names and parameters in a config's losses list: [{name: hinton, weight: 1.0, params: "
    "{temperature: 4}}].",
)

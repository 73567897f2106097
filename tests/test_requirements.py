"""setup.cfg declares what the code imports and nothing else: a requirement no module imports is a download and
an install constraint for nothing (the reverse direction is tests/test_cli.py's import check)."""

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions() -> set[str]:
    """Distributions of every third-party module the installed packages import (normalised names)."""
    modules = set()
    for folder in ("xmodal", "teachers", "students", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    dists = packages_distributions()
    return {norm(d) for m in modules - set(sys.stdlib_module_names) for d in dists.get(m, [m])}


def test_every_declared_requirement_is_imported():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["speech"].splitlines()
    declared = [norm(re.split(r"[<>=!~ ;\[]", line.strip())[0]) for line in lines if line.strip()]
    unused = sorted(set(declared) - imported_distributions())
    assert not unused, f"in setup.cfg install_requires/extras but imported nowhere: {unused}"

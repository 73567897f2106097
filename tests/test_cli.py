"""The command line: help lists the subcommands, info reports versions, unbuilt commands say so."""

import subprocess
import sys

from xmodal.cli import COMMANDS, main


def test_help_lists_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for name in ("info", "distill", "cache", "demo", "config", "export"):
        assert name in out


def test_info_json(capsys):
    import json

    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch_threads"] >= 1 and "cpu" in info["devices"] and info["torch"]


def test_group_without_subcommand_prints_help(capsys):
    assert main(["config"]) == 2
    assert "show" in capsys.readouterr().out


def test_commands_have_real_help():
    for name in COMMANDS.names():
        assert len(COMMANDS.get(name).help) > 10, name


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "xmodal", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("xmodal ")


def test_every_package_is_listed_in_setup_cfg():
    """A package missing from setup.cfg works in an editable install but vanishes from a wheel."""
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapping = {"xmodal": "xmodal", "teachers": "xmodal.teachers", "students": "xmodal.students",
               "tasks": "xmodal.tasks"}
    found = set()
    for folder, name in mapping.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"add to setup.cfg [options] packages: {sorted(found - listed)}"


def test_every_third_party_import_is_a_declared_requirement():
    """A package imported but not in install_requires works here (something else pulled it in) and breaks a
    clean install the day that something changes."""
    import ast
    import configparser
    import re
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    requirements = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    # optional features import their packages lazily and name their extra when they are missing
    extras = cfg["options.extras_require"]
    requirements += [line.strip() for name in extras if name != "test"
                     for line in extras[name].splitlines() if line.strip()]
    declared = {norm(re.split(r"[<>=!~ ;\[]", line)[0]) for line in requirements}
    modules = set()
    for folder in ("xmodal", "teachers", "students", "tasks"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    third_party = sorted(m for m in modules - set(sys.stdlib_module_names) if m != "xmodal")
    dists = packages_distributions()
    missing = [m for m in third_party if not any(norm(d) in declared for d in dists.get(m, [m]))]
    assert not missing, f"imported but not in setup.cfg install_requires: {missing}"

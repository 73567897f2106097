"""Plugin discovery: teachers, students and tasks register themselves into core registries on import."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

_LOADED = False

# Fallback when package metadata is unavailable (running from a source tree).
DEFAULT_PLUGINS = ("xmodal.teachers", "xmodal.students", "xmodal.tasks")


def import_submodules(package_name: str) -> None:
    """Import every module below a package so their registrations run."""
    package = importlib.import_module(package_name)
    for mod in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
        importlib.import_module(mod.name)


def load_plugins() -> None:
    """Import core commands and every `xmodal.plugins` entry point once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import_submodules("xmodal.commands")
    names = [ep.value for ep in entry_points(group="xmodal.plugins")] or list(DEFAULT_PLUGINS)
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise

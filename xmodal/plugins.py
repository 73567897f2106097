"""Plugin discovery: teachers, students and tasks register themselves into core registries when imported.

`load_plugins()` imports the core commands and every module of each `xmodal.plugins` entry point. The CLI calls
it at start; a registry lookup that misses calls it too, so the Python API finds plugin components by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

_STATE = {"loaded": False}

# Used when package metadata is unavailable (running from a source tree without installing).
DEFAULT_PLUGINS = ("xmodal.teachers", "xmodal.students", "xmodal.tasks")


def import_submodules(package_name: str) -> None:
    """Import a package and every module below it, so their registrations run."""
    package = importlib.import_module(package_name)
    for mod in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=f"{package_name}."):
        importlib.import_module(mod.name)


def plugin_packages() -> list[str]:
    return [ep.value for ep in entry_points(group="xmodal.plugins")] or list(DEFAULT_PLUGINS)


def load_plugins() -> None:
    """Import core commands and every plugin module once."""
    if _STATE["loaded"]:
        return
    _STATE["loaded"] = True
    import_submodules("xmodal.commands")
    for name in plugin_packages():
        import_submodules(name)


def plugins_loaded() -> bool:
    return _STATE["loaded"]

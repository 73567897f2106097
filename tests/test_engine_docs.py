"""The engine's module docstring is its user guide: it describes every resume mode the engine accepts, and the
modules and names it points to exist."""

import importlib
import re

import xmodal.engine as engine
from xmodal.engine import checkpoint


def resolve(dotted: str) -> object:
    """Import the longest module prefix of `dotted`, then get the remaining attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def test_every_resume_mode_is_described():
    doc = engine.__doc__
    for mode in (checkpoint.RESUME_LATEST, checkpoint.RESUME_AUTO):
        assert f'"{mode}"' in doc, f"the engine docstring does not describe resume: {mode}"
    for topic in ("checksum", "locked", "snapshotted", "(seed, sample key, epoch)", "replaced", "stages.json"):
        assert topic in doc, topic


def test_named_modules_and_objects_exist():
    doc = engine.__doc__
    names = sorted(set(re.findall(r"\bxmodal(?:\.\w+)+", doc)))
    assert names
    for dotted in names:
        resolve(dotted)
    for name in re.findall(r"^\s+\w+ = (\w+)\(", doc, flags=re.MULTILINE):  # the example's calls
        assert any(hasattr(importlib.import_module(m), name) for m in ("xmodal.engine", "xmodal.losses",
                                                                       "xmodal.fingerprint")) or name[0].isupper(), name

"""Model factories: one `create_teacher` and one `create_student`, each driven by its registry of kinds.

Teachers (`teachers/`) and students (`students/`) register their kinds here; jobs build every model through
these two functions, so a config names a kind ("open_clip", "speech", "wav2vec2", "lipreader") and never an
import path. A kind belongs to a model family ("clip", "speech", ...): a job asks for the family it can use
and a kind of another family is refused by name.

    teacher = create_teacher(cfg.teacher, family="speech", vocab=vocab)   # cfg.teacher.kind picks the loader
    model = create_student(model_cfg, preprocess_cfg)                     # the kind follows from the config

A builder is called as `build(cfg, *args, **context)`; what it returns is its family's model: a `ClipBundle`
(`xmodal.openclip`) for open_clip teachers, the module for students and speech recognisers (which carry their
own `fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from xmodal.errors import ConfigError
from xmodal.registry import Registry, suggest


@dataclass(frozen=True)
class ModelKind:
    """A registered kind: its builder, its model family and, optionally, which configs it recognises unnamed."""

    name: str
    build: Callable[..., Any]
    family: str
    accepts: Callable[[Any], bool] | None = None

    def __call__(self, cfg: Any, *args: Any, **context: Any) -> Any:
        return self.build(cfg, *args, **context)


TEACHERS: Registry[ModelKind] = Registry("teacher kind")
STUDENTS: Registry[ModelKind] = Registry("student kind")


def _register(registry: Registry[ModelKind], kind: str, family: str, accepts: Callable[[Any], bool] | None):
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        registry.register(kind, ModelKind(kind, fn, family, accepts), override=True)
        return fn

    return deco


def register_teacher(kind: str, *, family: str, accepts: Callable[[Any], bool] | None = None) -> Callable:
    """Decorator: `build(cfg, **context)` loads a teacher of `kind`; `accepts(cfg)` recognises configs without one."""
    return _register(TEACHERS, kind, family, accepts)


def register_student(kind: str, *, family: str, accepts: Callable[[Any], bool] | None = None) -> Callable:
    """Decorator: `build(cfg, *args, **context)` creates a student of `kind`."""
    return _register(STUDENTS, kind, family, accepts)


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg[key]` for a mapping, `cfg.key` for an object; `default` when absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _resolve(registry: Registry[ModelKind], role: str, cfg: Any, kind: str | None, family: str | None) -> ModelKind:
    kind = kind or config_value(cfg, "kind")
    if kind is None:
        matches = _matches(registry, cfg, family)
        if not matches:  # the kind may come from a plugin not imported yet
            registry.names()
            matches = _matches(registry, cfg, family)
        if len(matches) != 1:
            what = "several kinds" if matches else "no kind"
            raise ConfigError(
                f"{role}: {what} match this config ({type(cfg).__name__}); set its kind to one of "
                f"{', '.join(_kinds(registry, family))}"
            )
        return matches[0]
    if not isinstance(kind, str) or kind not in registry:
        label = f"{family} {role} kind" if family else f"{role} kind"
        known = _kinds(registry, family)
        raise ConfigError(f"unknown {label} '{kind}'{suggest(str(kind), known)}; known: {', '.join(known) or 'none'}")
    entry = registry.get(kind)
    if family is not None and entry.family != family:
        raise ConfigError(
            f"{role} kind '{kind}' is a {entry.family} model, but this job needs a {family} {role}; "
            f"kinds: {', '.join(_kinds(registry, family))}"
        )
    return entry


def _matches(registry: Registry[ModelKind], cfg: Any, family: str | None) -> list[ModelKind]:
    """The registered kinds (without importing plugins) that recognise `cfg`."""
    entries = list(registry._items.values())
    return [e for e in entries if e.accepts is not None and e.accepts(cfg) and (family is None or e.family == family)]


def _kinds(registry: Registry[ModelKind], family: str | None) -> list[str]:
    return [n for n in registry.names() if family is None or registry.get(n).family == family]


def _strip_kind(cfg: Any) -> Any:
    if isinstance(cfg, Mapping) and "kind" in cfg:
        return {k: v for k, v in cfg.items() if k != "kind"}
    return cfg


def create_teacher(cfg: Any, *, kind: str | None = None, family: str | None = None, **context: Any) -> Any:
    """Load the teacher that `cfg` describes (a config object or mapping), by `kind` or `cfg.kind`.

    `family` restricts the kinds to one model family; `context` (device, frozen, vocab, ...) goes to the loader.
    """
    entry = _resolve(TEACHERS, "teacher", cfg, kind, family)
    return entry.build(_strip_kind(cfg), **context)


def create_student(cfg: Any, *args: Any, kind: str | None = None, family: str | None = None, **context: Any) -> Any:
    """Create the student that `cfg` describes (an open_clip model_cfg, a lip-reader config, ...).

    Without `kind`, the config says it (`cfg.kind`) or the registered kinds recognise it.
    """
    entry = _resolve(STUDENTS, "student", cfg, kind, family)
    return entry.build(_strip_kind(cfg), *args, **context)


__all__ = [
    "STUDENTS",
    "TEACHERS",
    "ModelKind",
    "config_value",
    "create_student",
    "create_teacher",
    "register_student",
    "register_teacher",
]

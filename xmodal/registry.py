"""Name → constructor registries, so configs pick components by name instead of if-chains."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from xmodal.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ` (did you mean 'x'?)` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_kwargs(fn: Callable, kwargs: dict[str, Any], what: str) -> None:
    """Raise ConfigError naming any keyword that `fn` does not accept, with the closest valid one."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(
                f"{what}: unknown parameter '{key}'{suggest(key, valid)}; valid parameters: {', '.join(valid)}"
            )


class Registry(Generic[T]):
    """A named collection of components of one kind (losses, adapters, jobs, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False):
        """Register `obj` under `name`; without `obj`, return a decorator."""

        def add(item: T) -> T:
            if name in self._items and not override and self._items[name] is not item:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def _discover(self) -> None:
        """Plugins may provide more entries: import them once (a no-op after the first time)."""
        from xmodal.plugins import load_plugins, plugins_loaded

        if not plugins_loaded():
            load_plugins()

    def get(self, name: str) -> T:
        if name not in self._items:
            self._discover()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(f"unknown {self.kind} '{name}'{suggest(name, self.names())}; known: {known}")
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Construct the component `name`, checking keyword arguments against its signature first."""
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} '{name}'")
        return factory(**kwargs)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self._discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

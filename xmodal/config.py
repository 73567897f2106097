"""Typed configs: YAML (safe_load only) → dataclasses, with errors that name the file, key and fix.

A config is data: no key can import a module or run code. Components are chosen by registry name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from xmodal.errors import ConfigError
from xmodal.registry import Registry, suggest

C = TypeVar("C")


# ---------------------------------------------------------------- shared config blocks


@dataclass
class LossSpec:
    """One loss from the registry with its weight; `label` names it in logs when a loss is used twice."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def check_config(self, source: str, key: str) -> None:
        """Called when a config is loaded: the name is a registered loss, its params are keywords that loss takes
        and the weight is finite, so a typo fails at once (not after the data and the teacher are loaded)."""
        from xmodal.losses import LOSSES
        from xmodal.registry import check_kwargs

        at = f"{key}." if key else ""
        if not math.isfinite(self.weight):
            raise ConfigError(f"{source}: key '{at}weight': must be a finite number, got {self.weight}")
        try:
            factory = LOSSES.get(self.name)
        except ConfigError as e:
            raise ConfigError(f"{source}: key '{at}name': {e}") from None
        check_kwargs(factory, self.params, f"{source}: key '{at}params': loss '{self.name}'")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for a distillation or training run."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    ckpt_every: int = 0
    keep_last: int = 2
    num_workers: int = 0
    device: str = "auto"
    report_to: list[str] = field(default_factory=list)  # also log metrics to these (e.g. tensorboard)

    def check_config(self, source: str, key: str) -> None:
        """Every `report_to` entry names a metrics reporter, so a typo fails when the config loads."""
        from xmodal.engine.run import REPORTERS

        valid = REPORTERS.names()
        for i, name in enumerate(self.report_to):
            if name not in valid:
                at = f"{key}." if key else ""
                raise ConfigError(
                    f"{source}: key '{at}report_to[{i}]': unknown value '{name}'{suggest(str(name), valid)}; "
                    f"valid values: {', '.join(valid)}"
                )


# ---------------------------------------------------------------- YAML and overrides


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with yaml.safe_load; a missing file or bad syntax names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path; examples live in examples/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (numbers, bools, lists), never as code."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part; use dotted keys like train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b=value` override applied (creating mappings as needed)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override '{text}': '{'.'.join(keys[: i + 1])}' is a {type(nxt).__name__}, not a mapping"
                )
            node = nxt
        node[keys[-1]] = value
    return out


# ---------------------------------------------------------------- dict → dataclass


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp` and convert (nested dataclasses, lists, dicts)."""

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {_describe(value)}{extra}")

    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise fail(hint)
        return value
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail()
        return _from_mapping(tp, value, source, prefix=key + ".")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise fail(f" (needs exactly {len(args)} items)")
            return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        args = get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail(" (write true or false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def _from_mapping(cls: type[C], data: Mapping[str, Any], source: str, prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}'{suggest(str(key), list(known))}; "
                f"valid keys here: {', '.join(known)}"
            )
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{prefix}{name}' ({_type_name(hints[name])})")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: invalid '{prefix.rstrip('.') or cls.__name__}': {e}") from e
    check = getattr(obj, "check_config", None)
    if callable(check):  # checks a config block can make of itself beyond types (e.g. registry names)
        check(source, prefix.rstrip("."))
    return obj


def from_dict(cls: type[C], data: Mapping[str, Any], source: str = "<config>") -> C:
    """Build the dataclass `cls` from `data`, validating keys and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {_describe(data)}")
    return _from_mapping(cls, data, source)


def to_dict(cfg: Any) -> Any:
    """A plain-data copy of a config (for YAML dumps and checkpoints)."""
    if is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """A runnable job: its typed config class and the function that runs it (`run(cfg) -> dict`)."""

    config_cls: type
    run: Callable[..., Any]
    help: str = ""


JOBS: Registry[Job] = Registry("job")


def register_job(name: str, config_cls: type, help: str = "") -> Callable:
    """Decorator: register `run(cfg)` as the job `name` whose YAML validates against `config_cls`."""

    def deco(fn: Callable) -> Callable:
        JOBS.register(name, Job(config_cls, fn, help))
        return fn

    return deco


def load_job_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[str, Any]:
    """Load a job YAML: the top-level `job:` key picks the job; the rest is validated against its config."""
    data = apply_overrides(load_yaml(path), overrides)
    source = str(path)
    job_name = data.pop("job", None)
    if job_name is None:
        names = ", ".join(JOBS.names()) or "none registered"
        raise ConfigError(f"{source}: missing required key 'job' (which job to run; one of: {names})")
    if job_name not in JOBS:
        raise ConfigError(
            f"{source}: key 'job': unknown job '{job_name}'{suggest(str(job_name), JOBS.names())}; "
            f"known: {', '.join(JOBS.names()) or 'none'}"
        )
    return job_name, from_dict(JOBS.get(job_name).config_cls, data, source)

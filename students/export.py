"""Export a student to a plain open_clip folder: `open_clip.create_model_and_transforms("local-dir:DIR")` loads it.

The folder holds `open_clip_config.json` (`{"model_cfg": ..., "preprocess_cfg": ...}`) and
`open_clip_model.safetensors`. It is written into a temporary sibling folder, checked by loading it back with
open_clip, and only then renamed into place, so a crash never leaves a half-written export.

What is exported is the student's native open_clip model, its trained `logit_scale` included: the model the
same-space losses trained and evaluation scored. Alignment-space projections into the teacher's width (`space.*` in
a run's checkpoint) served only teacher-comparing losses and are left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.commands.export import RUN_EXPORTERS
from xmodal.errors import CheckpointError, ConfigError
from xmodal.registry import Registry

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
STUDENT_CONFIG_NAME = "student_open_clip.json"  # written by CLIP jobs beside their checkpoints

EXPORTERS: Registry = Registry("export format")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def default_preprocess_cfg(model: nn.Module | None, model_cfg: Mapping[str, Any]) -> dict:
    """The model's own preprocessing (open_clip's `visual.preprocess_cfg`), else open_clip's defaults."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    have = open_clip.get_model_preprocess_cfg(model) if model is not None else {}
    cfg = merge_preprocess_dict(PreprocessCfg(), dict(have or {}))
    cfg["size"] = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    return _jsonable(cfg)


def write_student_config(run_dir: str | os.PathLike, model_cfg: Mapping[str, Any],
                         preprocess_cfg: Mapping[str, Any] | None = None) -> Path:
    """Record a student's open_clip config in its run folder (read back by `xmodal export`)."""
    from xmodal.io import atomic_write_json

    path = Path(run_dir) / STUDENT_CONFIG_NAME
    atomic_write_json(path, {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(preprocess_cfg or {})})
    return path


def read_student_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from a student config file or open_clip_config.json (or a bare model_cfg)."""
    from xmodal.students.clip import read_open_clip_config

    data = read_open_clip_config(path)
    return dict(data["model_cfg"]), dict(data.get("preprocess_cfg") or {})


def _state_for_export(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    out = {}
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"state dict entry '{k}' is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    return out


def _check_loads(model_cfg: Mapping[str, Any], state: Mapping[str, Tensor]) -> None:
    """Build the model_cfg's architecture and load `state` strictly, so a broken export fails before writing."""
    from xmodal.students.clip import create_student

    model = create_student(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the model_cfg being exported: {e}") from e


def _verify(folder: Path, state: Mapping[str, Tensor]) -> None:
    """Load the written folder through open_clip and compare every tensor with what was meant to be written."""
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}", device="cpu")
    loaded = model.state_dict()
    missing = sorted(set(state) ^ set(loaded))
    if missing:
        raise CheckpointError(f"open_clip loaded different tensors than were exported: {missing[:8]}")
    for k, v in state.items():
        if not torch.equal(loaded[k].to(v.dtype), v):
            raise CheckpointError(f"open_clip read back '{k}' with different values; the export is not faithful")


@contextlib.contextmanager
def _staging_dir(out: Path, overwrite: bool):
    """A temporary sibling folder that replaces `out` on success and vanishes on failure."""
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    from xmodal.io import make_temp_dir

    tmp = make_temp_dir(out.parent, prefix=f".{out.name}.", suffix=".partial")  # mode per umask, not mkdtemp's 0700
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old / out.name, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_open_clip(
    model: nn.Module | Mapping[str, Tensor],
    model_cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    preprocess_cfg: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write an open_clip folder for `model` (an open_clip CLIP or its state dict) described by `model_cfg`.

    `preprocess_cfg` defaults to the model's own (mean, std, interpolation, resize mode) with the image size from
    `model_cfg`. With `verify`, the written folder is loaded back through open_clip and compared tensor by tensor.
    """
    from safetensors.torch import save_file

    from xmodal.io import default_file_mode

    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ConfigError(f"model_cfg lacks '{key}'; expected an open_clip model config")
    out = Path(out_dir)
    state = _state_for_export(model)
    _check_loads(model_cfg, state)
    if preprocess_cfg is None:
        preprocess_cfg = default_preprocess_cfg(model if isinstance(model, nn.Module) else None, model_cfg)
    else:
        preprocess_cfg = {**default_preprocess_cfg(None, model_cfg), **_jsonable(preprocess_cfg)}
    config = {"model_cfg": _jsonable(model_cfg), "preprocess_cfg": _jsonable(preprocess_cfg)}
    with _staging_dir(out, overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "xmodal"})
        os.chmod(tmp / WEIGHTS_NAME, default_file_mode())  # safetensors writes 0600; follow the umask instead
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for f in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if verify:
            _verify(tmp, state)
    return out


EXPORTERS.register("open_clip", export_open_clip)


def _export_open_clip_run(run_dir, out_dir=None, **kwargs) -> Path:
    return export_run(run_dir, "open_clip", out_dir, **kwargs)



# ---------------------------------------------------------------------------------------------- run folders


def common_prefixes(keys: list[str], depth: int = 3) -> dict[str, int]:
    """How many keys start with each dotted prefix of up to `depth` parts (for error messages)."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for d in range(1, min(depth, len(parts) - 1) + 1):
            p = ".".join(parts[:d]) + "."
            counts[p] = counts.get(p, 0) + 1
    return counts


def strip_prefix(state: Mapping[str, Tensor], expected: set[str], prefix: str | None = None) -> dict[str, Tensor]:
    """Select the open_clip weights from a (wrapped) module's state dict.

    With `prefix` given, keys starting with it lose it; with None, the prefix under which every expected key
    is present is found (the empty prefix included). Errors list the prefixes the state dict does have.
    """
    keys = list(state)
    if prefix is None:
        candidates: dict[str, int] = {}
        for k in keys:
            for e in expected:
                if k.endswith(e) and (len(k) == len(e) or k[-len(e) - 1] == "."):
                    p = k[: len(k) - len(e)]
                    candidates[p] = candidates.get(p, 0) + 1
        full = sorted(p for p, n in candidates.items() if all(p + e in state for e in expected))
        if not full:
            hint = ", ".join(f"'{p}' ({n} keys)" for p, n in sorted(common_prefixes(keys).items())[:20])
            raise CheckpointError(
                f"no prefix of the checkpoint's {len(keys)} weights holds all {len(expected)} open_clip weights of "
                f"the student model_cfg; prefixes present: {hint or 'none'}. Check the model_cfg matches the run, "
                "or pass --prefix"
            )
        if len(full) > 1:
            full.sort(key=len)  # e.g. the same CLIP under two adapters: the shortest holds it directly
            if not all(torch.equal(state[full[0] + e], state[p + e]) for p in full[1:] for e in expected):
                raise CheckpointError(
                    f"several prefixes hold a complete open_clip model with different weights: {full}; pass --prefix"
                )
        prefix = full[0]
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = sorted(expected - set(selected))
    if missing:
        hint = ", ".join(f"'{p}'" for p in sorted(common_prefixes(keys))[:20])
        raise CheckpointError(
            f"with prefix '{prefix}', {len(missing)} open_clip weights are missing (e.g. {missing[:3]}); "
            f"prefixes present: {hint or 'none'}"
        )
    return {e: selected[e] for e in sorted(expected)}


def load_run_checkpoint(path: str | os.PathLike) -> dict:
    """A run's checkpoint (or a file holding a state dict), checksum verified (`load_checkpoint`): a damaged or
    unsafe file is refused naming it."""
    from xmodal.engine.checkpoint import load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass --checkpoint PATH or check the run folder)")
    return dict(load_checkpoint(path, training_only=False))


def find_run_checkpoint(run: Path) -> Path:
    """`RUN/checkpoints/last.pt`, else the checkpoint named by `RUN/checkpoints/latest`, else the newest step_*.pt."""
    folder = run / "checkpoints"
    if (folder / "last.pt").is_file():
        return folder / "last.pt"
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text(encoding="utf-8").strip()
        if named.is_file():
            return named
    steps = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
    if steps:
        return steps[-1]
    raise CheckpointError(f"no checkpoint in {folder} (looked for last.pt, latest, step_*.pt); pass --checkpoint PATH")


def export_run(
    run_dir: str | os.PathLike,
    fmt: str = "open_clip",
    out_dir: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    model_config: str | os.PathLike | None = None,
    prefix: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a run's student: its newest checkpoint (state dict under "model") + `RUN/student_open_clip.json`.

    The checkpoint's "model" state dict may wrap the open_clip model under a prefix (e.g. `student.`); it is
    found automatically unless `prefix` is given.
    """
    from xmodal.students.clip import create_student

    exporter = EXPORTERS.get(fmt)
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"run folder not found: {run}")
    cfg_path = Path(model_config) if model_config else run / STUDENT_CONFIG_NAME
    if not cfg_path.exists():
        raise ConfigError(
            f"{cfg_path}: not found; the run has no student open_clip config. Pass --model-config FILE "
            "(an open_clip_config.json or a model_cfg JSON)"
        )
    model_cfg, preprocess_cfg = read_student_config(cfg_path)
    ckpt_path = Path(checkpoint) if checkpoint else find_run_checkpoint(run)
    ckpt = load_run_checkpoint(ckpt_path)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{ckpt_path}: key 'model' does not hold a state dict of tensors")
    expected = set(create_student(model_cfg).state_dict())
    weights = strip_prefix(state, expected, prefix)
    out = Path(out_dir) if out_dir else run / "export" / fmt
    return exporter(weights, model_cfg, out, preprocess_cfg or None, overwrite=overwrite)


RUN_EXPORTERS.register("open_clip", _export_open_clip_run)

__all__ = [
    "CONFIG_NAME",
    "EXPORTERS",
    "STUDENT_CONFIG_NAME",
    "WEIGHTS_NAME",
    "default_preprocess_cfg",
    "export_open_clip",
    "export_run",
    "find_run_checkpoint",
    "read_student_config",
    "strip_prefix",
    "write_student_config",
]


def load_clip_checkpoint(path: str | os.PathLike, *, device: str = "cpu"):
    """A trained xmodal CLIP student as a `ClipBundle` (model, transforms, tokenizer), from a run folder or checkpoint.

    Used by evaluators (`xmodal eval retrieval --checkpoint RUN`); the model config comes from the run's
    `student_open_clip.json`, the weights from the newest checkpoint (or the file given).
    """
    import open_clip

    from xmodal.device import resolve_device
    from xmodal.openclip import ClipBundle
    from xmodal.students.clip import create_student, student_transforms

    path = Path(path)
    if path.is_dir():
        run, ckpt = path, find_run_checkpoint(path)
    else:
        ckpt = path
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    cfg_path = run / STUDENT_CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path} not found: a CLIP run folder records its student's open_clip config there; for other "
            "models pass --model NAME --pretrained FILE, or an exported open_clip folder as --model"
        )
    model_cfg, preprocess_cfg = read_student_config(cfg_path)
    model = create_student(model_cfg, preprocess_cfg)
    state = load_run_checkpoint(ckpt)
    weights = state.get("model", state)
    model.load_state_dict(strip_prefix(weights, set(model.state_dict())))
    model = model.to(resolve_device(device)).eval().requires_grad_(False)
    train_tf, eval_tf = student_transforms(model)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=model_cfg.get("text_cfg", {}).get("context_length", 77))
    return ClipBundle(model, eval_tf, train_tf, tokenizer, str(run), str(ckpt), model_cfg,
                      dict(open_clip.get_model_preprocess_cfg(model)))

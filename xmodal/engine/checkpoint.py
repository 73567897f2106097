"""Checkpoints: atomic writes, checksummed `weights_only` loads, RNG capture, pruning and resume compatibility checks.

Layout: `run_dir/checkpoints/step_0000100.pt` (one per save, written to a temp file and renamed into place,
so a kill at any moment leaves every `step_*.pt` complete) plus a `latest` text file naming the newest one.

Each checkpoint ends with an 80-byte trailer holding the blake2b digest of everything before it (torch's zip
reader ignores bytes after the archive), so a flipped or lost byte is caught on load instead of trained on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodal.errors import CheckpointError
from xmodal.io import atomic_write, atomic_write_text
from xmodal.weights import load_weights

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: files end with a blake2b trailer
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
DIGEST_MAGIC = b"\0xmodal-blake2b:"  # 16 bytes, then the 64 hex digits of a 32-byte blake2b digest
TRAILER_SIZE = len(DIGEST_MAGIC) + 64

# Training settings a resume may change, e.g. to recover from a non-finite loss: they take effect from the
# resumed step on and are logged as a warning.
RESUME_MAY_RETUNE = ("train.lr", "train.warmup_steps", "train.clip_grad_norm", "train.precision")

# Config keys that may change between a run and its resume (matched against the dotted key or its last part).
RESUME_MAY_CHANGE = (
    "resume", "steps", "log_every", "eval_every", "ckpt_every", "keep_last", "num_workers", "device",
    "run_dir", "output_dir", "progress", "report_to", *RESUME_MAY_RETUNE,
)

# `resume` values that pick the newest intact checkpoint of the run folder: "latest" requires one, "auto"
# starts a new run when there is none (for jobs that continue their own interrupted sub-runs).
RESUME_LATEST, RESUME_AUTO = "latest", "auto"


# ---------------------------------------------------------------- RNG state as weights_only-safe data


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain lists (loadable with weights_only)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng."""
    version, values, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint holds %d CUDA RNG states, this machine has %d GPUs; CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


# ---------------------------------------------------------------- save / load


def plain_config(config: Any) -> Any:
    """A JSON-plain copy of a resolved config (paths and other objects become strings)."""
    from xmodal.config import to_dict

    return json.loads(json.dumps(to_dict(config), default=str))


class _Digesting:
    """A write-only file wrapper that hashes what passes through it (torch.save only calls write)."""

    def __init__(self, f):
        self.f, self.hash = f, hashlib.blake2b(digest_size=32)

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` atomically with a checksum trailer: the file at `path` is the old one or the complete new one."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_write(path, "wb") as f:
        out = _Digesting(f)
        torch.save(state, out)
        f.write(DIGEST_MAGIC + out.hash.hexdigest().encode("ascii"))
    return path


def read_digest(path: str | os.PathLike) -> tuple[str | None, str]:
    """(stored digest or None when the file has no trailer, digest of the bytes before the trailer)."""
    path = Path(path)
    size = path.stat().st_size
    stored = None
    with open(path, "rb") as f:
        if size >= TRAILER_SIZE:
            f.seek(size - TRAILER_SIZE)
            tail = f.read(TRAILER_SIZE)
            if tail.startswith(DIGEST_MAGIC):
                stored = tail[len(DIGEST_MAGIC):].decode("ascii", errors="replace")
        f.seek(0)
        h = hashlib.blake2b(digest_size=32)
        left = size - TRAILER_SIZE if stored is not None else size
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return stored, h.hexdigest()


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Check the blake2b trailer; True when verified, False for a file without one (older xmodal, checked later).

    Raises CheckpointError naming the file when the digest does not match (a flipped, lost or added byte).
    """
    path = Path(path)
    stored, actual = read_digest(path)
    if stored is None:
        return False
    if stored != actual:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its blake2b checksum does not match its content (a byte changed or "
            "went missing after it was written). Use an earlier checkpoint of the run"
        )
    return True


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    training_only: bool = True) -> dict[str, Any]:
    """Verify the checksum and load with `weights_only=True` (`xmodal.weights.load_weights`); a missing, damaged or
    unsafe file raises CheckpointError naming the path.

    `training_only=False` also accepts other torch files holding a dict (a recogniser model file, a bare state
    dict), for commands that read either: their checksum is checked when they carry one, and a training
    checkpoint among them must carry one as always.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    verified = verify_checkpoint(path)
    state = load_weights(path, map_location=map_location, what="checkpoint")
    training = isinstance(state, dict) and "model" in state and "step" in state
    if training_only and not training:
        raise CheckpointError(f"{path} is not an xmodal training checkpoint (needs 'model' and 'step' entries)")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint or model file holding a dict, got {type(state).__name__}")
    if training and not verified:
        if int(state.get("format", 1)) >= 2:
            raise CheckpointError(f"checkpoint {path} is damaged: its checksum trailer is missing or unreadable")
        log.warning("%s has no checksum (written by an older xmodal); it loaded, but damage cannot be ruled out", path)
    return state


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step_{step:07d}.pt"


class CheckpointManager:
    """Numbered checkpoints in one folder, a `latest` pointer, and pruning to the newest `keep_last`."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 2):
        self.folder = Path(folder)
        self.keep_last = int(keep_last)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending (temp files of interrupted writes are ignored)."""
        if not self.folder.is_dir():
            return []
        found = (STEP_FILE.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none."""
        steps = self.steps()
        return step_path(self.folder, steps[-1]) if steps else None

    def remove_stale_temps(self) -> None:
        """Delete temp files left by a writer that was killed mid-write (never a complete checkpoint)."""
        if self.folder.is_dir():
            for p in self.folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        path = save_checkpoint(state, step_path(self.folder, step))
        atomic_write_text(self.folder / "latest", path.name + "\n")
        self.prune(keep=path)
        return path

    def prune(self, keep: Path | None = None) -> None:
        if self.keep_last <= 0:
            return
        for step in self.steps()[: -self.keep_last]:
            p = step_path(self.folder, step)
            if p != keep:
                p.unlink(missing_ok=True)

    def resolve(self, resume: str | os.PathLike) -> Path | None:
        """`latest`/`auto` → newest checkpoint here (None if there is none yet); anything else is a path."""
        if str(resume) in (RESUME_LATEST, RESUME_AUTO):
            return self.latest()
        path = Path(resume)
        if path.is_dir():
            inner = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path).latest()
            if inner is None:
                raise CheckpointError(f"resume: no step_*.pt checkpoint found in {path}")
            return inner
        if not path.is_file():
            raise CheckpointError(
                f"resume: checkpoint {path} does not exist (use 'latest', 'auto' or the path of a step_*.pt file)"
            )
        return path


# ---------------------------------------------------------------- resume compatibility


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not obj and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: obj}


def config_differences(old: Any, new: Any, may_change: Iterable[str] = RESUME_MAY_CHANGE) -> list[str]:
    """Lines `key: old → new` for every config value that differs and is not allowed to change on resume."""
    a, b = _flatten(plain_config(old) or {}), _flatten(plain_config(new) or {})
    patterns = list(may_change)

    def allowed(key: str) -> bool:
        leaf = key.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)

    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va == vb or allowed(key):
            continue
        if va is missing and _is_default(new, key, vb):  # a setting added since the checkpoint, left at its default
            continue
        fa = "(absent)" if va is missing else json.dumps(va)
        fb = "(absent)" if vb is missing else json.dumps(vb)
        lines.append(f"{key}: {fa} → {fb}")
    return lines


_MISSING = object()


def _is_default(config: Any, dotted: str, value: Any) -> bool:
    """Whether `value` is the dataclass default of the field `dotted` (a.b.c) of `config`; False when unknown."""
    import dataclasses

    from xmodal.config import to_dict

    *parents, leaf = dotted.split(".")
    obj = config
    for part in parents:
        if not dataclasses.is_dataclass(obj):
            return False
        obj = getattr(obj, part, _MISSING)
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return False
    field = next((f for f in dataclasses.fields(obj) if f.name == leaf), None)
    if field is None:
        return False
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return False
    return json.loads(json.dumps(to_dict(default), default=str)) == value


def retuned_settings(old: Any, new: Any, keys: Iterable[str] = RESUME_MAY_RETUNE) -> list[str]:
    """Lines `key: old → new` for the training settings in `keys` that a resume changes."""
    a, b = _flatten(plain_config(old) or {}), _flatten(plain_config(new) or {})
    lines = []
    for key in keys:
        if (key in a or key in b) and a.get(key, _MISSING) != b.get(key, _MISSING):
            fa, fb = (json.dumps(d[key]) if key in d else "(absent)" for d in (a, b))
            lines.append(f"{key}: {fa} → {fb}")
    return lines


def check_resume_compatible(
    ckpt: Mapping[str, Any],
    path: str | os.PathLike,
    config: Any,
    teacher_fingerprint: str | None,
    may_change: Iterable[str] = RESUME_MAY_CHANGE,
) -> None:
    """Raise CheckpointError naming what differs when a checkpoint was made by another teacher or config."""
    old_fp = ckpt.get("teacher_fingerprint")
    if old_fp != teacher_fingerprint:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with teacher fingerprint {old_fp}, but this run's "
            f"teacher has fingerprint {teacher_fingerprint}. Use the same teacher weights and preprocessing, "
            "or start a new run folder."
        )
    if config is not None and ckpt.get("config") is not None:
        diffs = config_differences(ckpt["config"], config, may_change)
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: the config differs from the one it was trained with:\n  "
                + "\n  ".join(diffs)
                + "\nRestore these values, or start a new run folder to train with the new config."
            )

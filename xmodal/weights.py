"""Reading torch weight files safely: `weights_only` loading, and errors that name the file and never invite
unsafe loading.

A file whose pickle asks for anything but tensors and plain containers (a class to build, a function to call) is
refused: unpickling it could run code from the file. The error says which object it asked for and how to make a
file xmodal can read; it does not pass on torch's own advice, which suggests loading such files unsafely.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

from xmodal.errors import CheckpointError

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.DOTALL)
_UNSAFE_HINTS = ("weights_only", "Weights only load failed", "arbitrary code execution", "trusted source")


def _refused_by_torch(exc: BaseException) -> bool:
    """True for torch's weights_only refusals: their message advises loading the file unsafely."""
    return isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc)


def is_unsafe_pickle(exc: BaseException) -> bool:
    """True when torch refused a file because its pickle asks for objects outside the weights-only set (a class
    to build, a function to call); a pickle that is merely garbage is a corrupt file, not an unsafe one."""
    return _refused_by_torch(exc) and _GLOBAL.search(str(exc)) is not None


def error_detail(exc: BaseException) -> str:
    """What went wrong, in one line that does not repeat torch's weights_only advice."""
    found = _UNPICKLER_ERROR.search(str(exc)) if _refused_by_torch(exc) else None
    if found:
        return found.group(1).splitlines()[0]
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not any(h in line for h in _UNSAFE_HINTS):
            return line
    return type(exc).__name__


def safe_cause(exc: BaseException) -> BaseException | None:
    """What to chain a weights error to: nothing for torch's weights_only refusals (their message advises unsafe
    loading, and a traceback would show it), the original error otherwise. Use
    `raise weights_error(...) from safe_cause(e)`.
    """
    return None if _refused_by_torch(exc) or any(h in str(exc) for h in _UNSAFE_HINTS) else exc


def weights_error(path: str | os.PathLike, exc: BaseException, what: str = "weights file") -> CheckpointError:
    """A CheckpointError for a torch file that could not be read, naming the file and what is wrong with it."""
    if is_unsafe_pickle(exc):
        found = _GLOBAL.search(str(exc))
        asks = f" (it asks for {found.group(1)})" if found else ""
        return CheckpointError(
            f"{path}: refused to load this {what}: besides tensors it holds pickled Python objects{asks}, and "
            "unpickling them could run code from the file. xmodal reads weights only: use a state dict of "
            "tensors (torch.save(model.state_dict(), path)) or a .safetensors file, made from a copy you trust"
        )
    return CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {error_detail(exc)}); the file is "
                           "corrupt, truncated or not a torch file")


def load_weights(path: str | os.PathLike, *, map_location: Any = "cpu", what: str = "weights file") -> Any:
    """`torch.load(path, weights_only=True)`; a missing, corrupt or unsafe file raises CheckpointError naming it.

    The one place xmodal reads torch files: checkpoints (`xmodal.engine.checkpoint.load_checkpoint`, which checks
    their checksum first), model files and teacher weights all come through here.
    """
    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for truncated, corrupt or unsafe files
        raise weights_error(path, e, what) from safe_cause(e)

"""Content fingerprints of models and configs, so caches and resumes refuse a different teacher."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def hash_json(obj: Any) -> str:
    """Stable short hash of JSON-able data (sorted keys)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def state_dict_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Hash of every tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module, extra: Any = None) -> str:
    """Weights hash plus `extra` (e.g. the preprocessing config): equal only for the same teacher."""
    weights = state_dict_fingerprint(model.state_dict())
    return weights if extra is None else f"{weights}-{hash_json(extra)}"

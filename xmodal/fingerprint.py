"""The one fingerprint recipe: model weights + preprocessing + the data, so every cache and resume refuses a
teacher or data set other than its own.

- `model_fingerprint(model, extra)`: the weights (every tensor's name, dtype, shape and bytes) plus `extra`, the
  preprocessing and settings that change what the model computes from the same input.
- `data_identity(files, media=..., **values)`: the data, as named parts: the content hash of each data file
  (CSV, JSON lines manifest), the path, size and modification time of the media files it names (images and
  audio are not re-read), and settings such as a vocabulary, transcripts, class lists or prompt templates.
- `fingerprint(model, extra, data=...)`: both in one string, `<model>|data:<part>=<hash>,...`. It stays a plain
  string (checkpoints and manifests store it as is), yet `fingerprint_parts` and `describe_difference` read
  the parts back, so an error can say whether the teacher or which part of the data differs.

The teacher cache, trained-teacher reuse in the jobs, the retrieval embedding store and the checkpoints'
teacher fingerprint all use these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DIGEST_SIZE = 12  # bytes: 24 hex characters per hash
DATA_MARK = "|data:"


def hash_json(obj: Any) -> str:
    """Stable short hash of JSON-able data (sorted keys)."""
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=DIGEST_SIZE).hexdigest()


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of one file (blake2b, streamed): equal only for byte-identical files."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def media_digest(paths: Iterable[str | os.PathLike]) -> str:
    """Hash of each file's path, size and modification time, in order: notices a replaced image or audio file
    without reading it. A missing file counts as its own state (the data set reports it when it loads it)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{path}|missing\n".encode())
    return h.hexdigest()


def state_dict_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of every tensor's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module, extra: Any = None) -> str:
    """Weights hash plus `extra` (the preprocessing and settings): equal only for the same teacher."""
    weights = state_dict_fingerprint(model.state_dict())
    return weights if extra is None else f"{weights}-{hash_json(extra)}"


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class DataIdentity:
    """The data a model's outputs were computed on, as named parts (part → hash).

    `files` maps the parts that are data files to their paths, so a cache can check later that they are unchanged.
    """

    parts: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """One hash of all parts."""
        return hash_json(self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"parts": dict(self.parts), "files": dict(self.files)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DataIdentity | None:
        if not data:
            return None
        return cls(dict(data.get("parts", {})), dict(data.get("files", {})))

    def differences(self, other: DataIdentity | Mapping[str, str]) -> list[str]:
        """Names of the parts that differ between self and `other` (present in one only, or other hashes)."""
        theirs = other.parts if isinstance(other, DataIdentity) else dict(other)
        return sorted(k for k in set(self.parts) | set(theirs) if self.parts.get(k) != theirs.get(k))

    def changed_files(self) -> list[str]:
        """Descriptions of the recorded data files whose content is no longer what it was; [] if all are intact.

        A file that cannot be found is skipped (the data may have moved; the caller compares parts then)."""
        changed = []
        for part, path in sorted(self.files.items()):
            try:
                now = file_digest(path)
            except FileNotFoundError:
                continue
            if now != self.parts.get(part):
                changed.append(f"{part} ({path}): its content changed")
        return changed


def _part_name(name: str) -> str:
    bad = set(name) & set("|,=:")
    if bad or not name:
        raise ValueError(f"data identity part name {name!r} must be non-empty without any of | , = :")
    return name


def data_identity(
    files: Mapping[str, str | os.PathLike] | None = None,
    *,
    media: Iterable[str | os.PathLike] | None = None,
    **values: Any,
) -> DataIdentity:
    """The data's identity: content hash of each named data file, `media` file states, and named settings.

    `data_identity({"train": "train.csv"}, media=image_paths, vocab=" 'abc")`: a changed byte in train.csv, a
    replaced image or another vocabulary each give another identity (and name their part). None values are left
    out, so a setting a job does not have does not change the identity.
    """
    parts: dict[str, str] = {}
    paths: dict[str, str] = {}
    for name, path in (files or {}).items():
        resolved = str(Path(path).resolve())
        parts[_part_name(name)] = file_digest(resolved)
        paths[name] = resolved
    if media is not None:
        parts["media"] = media_digest(media)
    for name, value in values.items():
        if value is not None:
            parts[_part_name(name)] = hash_json(value)
    return DataIdentity(parts, paths)


# ---------------------------------------------------------------- the combined fingerprint


def fingerprint(model: nn.Module | str, extra: Any = None, *, data: DataIdentity | None = None) -> str:
    """Model weights + preprocessing (`extra`) + data: the identity of a teacher's outputs on a data set.

    `model` may be a module or an already computed model fingerprint (then `extra` must be None).
    """
    if isinstance(model, str):
        if extra is not None:
            raise ValueError("fingerprint: `extra` applies to a module, not to a computed model fingerprint")
        base = model
    else:
        base = model_fingerprint(model, extra)
    if data is None or not data.parts:
        return base
    return base + DATA_MARK + ",".join(f"{k}={v}" for k, v in sorted(data.parts.items()))


def fingerprint_parts(fp: str) -> tuple[str, dict[str, str] | None]:
    """(model fingerprint, data parts or None when `fp` says nothing about the data)."""
    base, mark, rest = fp.partition(DATA_MARK)
    if not mark:
        return fp, None
    parts = {}
    for item in rest.split(","):
        name, _, value = item.partition("=")
        parts[name] = value
    return base, parts


def describe_difference(recorded: str, current: str) -> str | None:
    """What differs between two fingerprints, in words; None when `current` is satisfied by `recorded`.

    A `current` without data parts only asks for the same model; with data parts, the data must match too.
    """
    old_model, old_data = fingerprint_parts(recorded)
    new_model, new_data = fingerprint_parts(current)
    if old_model != new_model:
        return f"the teacher differs (weights or preprocessing: {old_model} → {new_model})"
    if new_data is None or old_data == new_data:
        return None
    if old_data is None:
        return "it records no data identity (made by an older xmodal), so it cannot show it holds this data"
    names = DataIdentity(old_data).differences(new_data)
    return "the data differ: " + ", ".join(names)


__all__ = [
    "DataIdentity",
    "data_identity",
    "describe_difference",
    "file_digest",
    "fingerprint",
    "fingerprint_parts",
    "hash_json",
    "media_digest",
    "model_fingerprint",
    "state_dict_fingerprint",
]

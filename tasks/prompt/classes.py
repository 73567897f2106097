"""Class lists, the base/novel split and the teacher's stored class vectors `W_T`.

`W_T [C, D_t]` is what zero-shot classification builds from the teacher's text tower (each class's mean of
normalised template embeddings, renormalised: `tasks.zeroshot.build_zeroshot_classifier`). It is computed once and
kept in a small safetensors file, written atomically, whose fingerprint covers the teacher (weights and
preprocessing), the class list and the templates (`xmodal.fingerprint`); training and evaluation read the file and
never run the teacher's text tower. A file made for another teacher, class list or template set is refused, naming
what differs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xmodal.errors import CheckpointError, DataError
from xmodal.fingerprint import data_identity, describe_difference, fingerprint, hash_json

log = logging.getLogger(__name__)

CLASS_VECTORS_FORMAT = "xmodal-class-vectors"
CLASS_VECTORS_VERSION = 1


@dataclass
class ClassList:
    """Class names and prompt templates (each with a `{}` for the name); `source` names where they came from."""

    names: list[str]
    templates: list[str]
    source: str = "<config>"

    def check(self) -> ClassList:
        """Refuse an empty list, repeated names and templates without a `{}` placeholder, naming the source."""
        if not self.names:
            raise DataError(f"{self.source}: the class list is empty; give at least two class names")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{self.source}: class {i} has no name ({name!r})")
            if name in seen:
                raise DataError(f"{self.source}: class '{name}' is listed twice (classes {seen[name]} and {i})")
            seen[name] = i
        if not self.templates:
            raise DataError(f"{self.source}: no prompt templates; give at least one, e.g. 'a photo of a {{}}.'")
        for i, t in enumerate(self.templates):
            if not isinstance(t, str) or "{}" not in t:
                raise DataError(f"{self.source}: template {i} {t!r} has no '{{}}' placeholder for the class name")
        return self

    def __len__(self) -> int:
        return len(self.names)

    def identity(self):
        """The class list's part of a fingerprint (`xmodal.fingerprint.data_identity`)."""
        return data_identity(classnames=list(self.names), templates=list(self.templates))


def read_class_file(path: str | os.PathLike) -> ClassList:
    """`classnames` and `templates` of a JSON file (a zeroshot.json or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "zeroshot.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: class list file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or "classnames" not in data:
        raise DataError(f"{path}: expected a JSON object with 'classnames' (and 'templates')")
    names, templates = data.get("classnames"), data.get("templates", [])
    if not isinstance(names, list) or not isinstance(templates, list):
        raise DataError(f"{path}: 'classnames' and 'templates' must be lists")
    return ClassList([str(n) for n in names], [str(t) for t in templates], str(path))


# ---------------------------------------------------------------------------------------------- base / novel


def base_novel_split(classnames: list[str]) -> tuple[list[int], list[int]]:
    """(base, novel) class indices: classes sorted by name, the first ⌈C/2⌉ are base, the rest novel (each list in
    name order). Needs at least two classes."""
    if len(classnames) < 2:
        raise DataError(f"a base/novel split needs at least two classes, got {len(classnames)}")
    order = sorted(range(len(classnames)), key=lambda i: (classnames[i], i))
    k = math.ceil(len(order) / 2)
    return order[:k], order[k:]


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN/(B+N); 0 when both are 0."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


# ---------------------------------------------------------------------------------------------- class vectors


@dataclass
class ClassVectors:
    """Normalised teacher class vectors [C, D_t] with the class list, templates and fingerprint they were made for."""

    vectors: Tensor
    classes: ClassList
    fingerprint: str
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def class_vectors_fingerprint(teacher_fingerprint: str, classes: ClassList) -> str:
    """Teacher + class list + templates: the identity of a W_T."""
    return fingerprint(teacher_fingerprint, data=classes.identity())


def default_store_path(store_dir: str | os.PathLike, fp: str) -> Path:
    return Path(store_dir) / f"{hash_json(fp)[:20]}.safetensors"


def compute_class_vectors(teacher: Any, classes: ClassList, device: str | torch.device = "cpu") -> Tensor:
    """Run the teacher's text tower over every class × template, once: [C, D_t] (zero-shot's class vectors)."""
    from xmodal.tasks.zeroshot import build_zeroshot_classifier

    log.info("class vectors: running the teacher's text tower over %d classes × %d templates (stored afterwards)",
             len(classes.names), len(classes.templates))
    weights = build_zeroshot_classifier(teacher.model, teacher.tokenizer, classes.names, classes.templates, device)
    return weights.t().contiguous().float().cpu()


def save_class_vectors(path: str | os.PathLike, cv: ClassVectors, teacher_name: str | None = None) -> Path:
    """Write W_T and what it was made for as one safetensors file, atomically."""
    from safetensors.torch import save

    from xmodal.io import atomic_write

    meta = {"format": CLASS_VECTORS_FORMAT, "version": str(CLASS_VECTORS_VERSION), "fingerprint": cv.fingerprint,
            "classnames": json.dumps(cv.classes.names), "templates": json.dumps(cv.classes.templates),
            "teacher": str(teacher_name or "")}
    data = save({"class_vectors": cv.vectors.detach().cpu().float().contiguous()}, metadata=meta)
    path = Path(path)
    with atomic_write(path) as f:
        f.write(data)
    return path


def load_class_vectors(path: str | os.PathLike, *, expected: str | None = None,
                       classes: ClassList | None = None) -> ClassVectors:
    """Read a W_T file; with `classes`/`expected` (the fingerprint it must have), one made for another class list
    size, class list, template set or teacher is refused, saying which."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"class vectors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            vectors = f.get_tensor("class_vectors")
        names, templates = json.loads(meta["classnames"]), json.loads(meta["templates"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable class vectors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != CLASS_VECTORS_FORMAT:
        raise CheckpointError(f"{path}: not an xmodal class vectors file (format {meta.get('format')!r})")
    if vectors.dim() != 2 or vectors.shape[0] != len(names):
        raise CheckpointError(f"{path}: holds vectors of shape {list(vectors.shape)} for {len(names)} class names")
    stored = ClassList(names, templates, str(path))
    if classes is not None and len(classes.names) != vectors.shape[0]:
        raise CheckpointError(
            f"{path}: holds class vectors for {vectors.shape[0]} classes, but the class list ({classes.source}) has "
            f"{len(classes.names)}; point class_vectors at another file (or remove this one) to store the new list"
        )
    if expected is not None:
        why = describe_difference(meta.get("fingerprint", ""), expected)
        if why:
            raise CheckpointError(
                f"{path}: these class vectors were made for another teacher, class list or template set: {why}; "
                "point class_vectors at another file (or remove this one) to compute them for this teacher"
            )
    return ClassVectors(vectors.float(), stored, meta.get("fingerprint", ""), path)


def obtain_class_vectors(teacher: Any, classes: ClassList, *, path: str | os.PathLike | None = None,
                         store_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                         teacher_fingerprint: str | None = None) -> ClassVectors:
    """W_T for `teacher` and `classes`: read from `path` (or the store's file for this identity) when it is there,
    else computed once with the teacher's text tower and written there. A file at `path` made for anything else is
    refused. `teacher` may be None when the file exists and `teacher_fingerprint` is given."""
    fp_teacher = teacher_fingerprint or teacher.fingerprint
    fp = class_vectors_fingerprint(fp_teacher, classes)
    if path is None:
        if store_dir is None:
            raise ValueError("obtain_class_vectors needs a path or a store folder")
        path = default_store_path(store_dir, fp)
    path = Path(path)
    if path.is_file():
        cv = load_class_vectors(path, expected=fp, classes=classes)
        log.info("class vectors: read %s (%d classes × %d templates)", path, len(classes), len(classes.templates))
        return ClassVectors(cv.vectors, classes, fp, path)
    if teacher is None:
        raise CheckpointError(f"class vectors file not found: {path}, and no teacher is loaded to compute them")
    vectors = compute_class_vectors(teacher, classes, device)
    cv = ClassVectors(vectors, classes, fp, path)
    save_class_vectors(path, cv, getattr(teacher, "name", None))
    log.info("class vectors: stored %s", path)
    return cv


__all__ = [
    "ClassList",
    "ClassVectors",
    "base_novel_split",
    "class_vectors_fingerprint",
    "compute_class_vectors",
    "harmonic_mean",
    "load_class_vectors",
    "obtain_class_vectors",
    "read_class_file",
    "save_class_vectors",
]

"""Commands for prompt-distilled students: `xmodal eval zeroshot --model RUN` evaluates one (its prompts, its
projector and the teacher's stored class vectors), and `xmodal export RUN --format prompted` writes it as one
`torch.export` program that plain torch loads.

The zero-shot command is the one `tasks.zeroshot` registers, taken over unchanged for every other `--model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from xmodal.commands import COMMANDS, register_command
from xmodal.commands.export import RUN_EXPORTERS
from xmodal.errors import CheckpointError, ConfigError
from xmodal.tasks import zeroshot as _zeroshot
from xmodal.tasks.prompt.classes import (
    ClassList,
    ClassVectors,
    class_vectors_fingerprint,
    default_store_path,
    load_class_vectors,
    obtain_class_vectors,
)
from xmodal.tasks.prompt.job import PROMPTS_NAME, RECORD_FORMAT, RECORD_NAME

log = logging.getLogger(__name__)


def is_prompted_run(path: str | os.PathLike | None) -> bool:
    """True for a prompt_distill run folder (it holds prompted_student.json)."""
    return path is not None and (Path(path) / RECORD_NAME).is_file()


def read_record(run: str | os.PathLike) -> dict[str, Any]:
    path = Path(run) / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; {run} is not a finished prompt_distill run folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"{path}: not a prompted-student record (format {record.get('format')!r})")
    return record


def _load_clip(source: dict[str, Any], what: str, device: torch.device):
    """A CLIP bundle from a run record's source entry (frozen)."""
    if "run" in source:
        from xmodal.students.export import load_clip_checkpoint

        return load_clip_checkpoint(source["run"], device=str(device))
    if source.get("model"):
        from xmodal.teachers.clip import load_open_clip

        return load_open_clip(source["model"], source.get("pretrained"), device=str(device), frozen=True)
    raise CheckpointError(f"the run's {what} was built with random weights (model_cfg without training), so it "
                          "cannot be loaded again")


def load_prompted_run(run: str | os.PathLike, device: torch.device, prompts: str | os.PathLike | None = None):
    """(prompted student with its prompts and projector, the student's CLIP bundle, the run record)."""
    from xmodal.models import create_student

    record = read_record(run)
    clip = _load_clip(record["student"], "student", device)
    spec = {"prompts": {"n": record["n_prompts"], "depth": record["depth"]}, "projector": record["projector"]}
    student = create_student(spec, clip.model, kind="prompted_clip", family="clip",
                             teacher_dim=int(record["teacher_dim"]), device=device)
    student.load_prompts(Path(prompts) if prompts else Path(run) / record.get("prompts", PROMPTS_NAME))
    return student.eval(), clip, record


def run_class_vectors(run: str | os.PathLike, record: dict[str, Any], classes: ClassList, device: torch.device,
                      path: str | os.PathLike | None = None) -> ClassVectors:
    """W_T of the run's teacher for `classes`: the stored file (the run's, `path`, or the run's store), else computed
    once with the run's teacher and stored (`path` or RUN/class_vectors/)."""
    fp = class_vectors_fingerprint(record["teacher_fingerprint"], classes)
    candidates = [Path(path)] if path else [Path(record["class_vectors"]),
                                            default_store_path(Path(run) / "class_vectors", fp)]
    for p in candidates:
        if p.is_file() and (path or _fingerprint_of(p) == fp):
            cv = load_class_vectors(p, expected=fp, classes=classes)
            return ClassVectors(cv.vectors, classes, fp, p)
    teacher = _load_clip(record["teacher"], "teacher", device)
    if teacher.fingerprint != record["teacher_fingerprint"]:
        raise CheckpointError(
            f"the run's teacher ({record['teacher']}) is not the one it was trained with (fingerprint "
            f"{teacher.fingerprint}, recorded {record['teacher_fingerprint']}); pass --class-vectors FILE made by it"
        )
    store = Path(path) if path else default_store_path(Path(run) / "class_vectors", fp)
    return obtain_class_vectors(teacher, classes, path=store, device=device)


def _fingerprint_of(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:  # noqa: BLE001 - an unreadable candidate is simply not this one
        return None


def evaluate_prompted(run: str | os.PathLike, data: _zeroshot.ZeroShotData, device: torch.device, *,
                      batch_size: int = 64, class_vectors: str | os.PathLike | None = None) -> dict[str, Any]:
    """top-1/top-5/mean per-class recall (and base/novel/HM with two classes or more) of a prompted student on a
    zero-shot task, classifying against the run teacher's class vectors for the task's classes."""
    from xmodal.tasks.prompt.classes import base_novel_split
    from xmodal.tasks.prompt.data import ImageItem
    from xmodal.tasks.prompt.evaluate import base_novel_metrics, embed_items

    classes = ClassList(list(data.classnames), list(data.templates), data.source).check()
    student, clip, record = load_prompted_run(run, device)
    cv = run_class_vectors(run, record, classes, device, class_vectors)
    student.set_class_vectors(cv.vectors)
    items = [ImageItem(path, path, label) for path, label in data.images]
    emb = embed_items(student.encode_image, items, clip.eval_transform, batch_size=batch_size, device=device,
                      source=data.source)
    labels = torch.tensor([label for _, label in data.images])
    metrics: dict[str, Any] = dict(_zeroshot.zeroshot_metrics(emb @ cv.vectors.t(), labels))
    if len(classes) >= 2:
        base, novel = base_novel_split(classes.names)
        present = set(labels.tolist())
        if present & set(base) and present & set(novel):
            bn = base_novel_metrics(emb, labels, cv.vectors, classes.names)
            metrics.update({k: bn[k] for k in ("base", "novel", "hm")})
    metrics["class_vectors"] = str(cv.path)
    return metrics


# ---------------------------------------------------------------------------------------------- eval zeroshot

_PLAIN = COMMANDS.get("eval zeroshot")


def configure(p: argparse.ArgumentParser) -> None:
    _PLAIN.configure(p)
    p.add_argument("--class-vectors", default=None,
                   help="with a prompt_distill run as --model: the teacher's class vectors file for these classes "
                        "(default: the run's, or computed once with the run's teacher and stored in RUN/class_vectors)")


def run(args: argparse.Namespace) -> int:
    if not is_prompted_run(args.model):
        if getattr(args, "class_vectors", None):
            raise ConfigError("--class-vectors applies to a prompt_distill run folder given as --model")
        return _PLAIN.run(args)
    from xmodal.device import resolve_device
    from xmodal.io import atomic_write_json

    data = _zeroshot.data_from_args(args)
    device = resolve_device(args.device)
    metrics = evaluate_prompted(args.model, data, device, batch_size=args.batch_size,
                                class_vectors=args.class_vectors)
    metrics = {"task": "zeroshot_classification", "model": args.model, "prompted": True,
               **_zeroshot.data_fields(data), **metrics}
    print(json.dumps(metrics, indent=2))
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0


register_command(
    "eval zeroshot", _PLAIN.help, configure, run, override=True,
    description=_PLAIN.description + " A prompt_distill run folder as --model evaluates its prompted student "
    "against the teacher's stored class vectors (base/novel/HM included).",
)


# ---------------------------------------------------------------------------------------------- export


def export_prompted_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                        checkpoint: str | os.PathLike | None = None, model_config: Any = None, prefix: Any = None,
                        overwrite: bool = False) -> Path:
    """`xmodal export RUN --format prompted`: the run's image encoder with its prompts and projector merged, as a
    `torch.export` program, with the run's class vectors (`--checkpoint` may name another prompts file)."""
    from xmodal.students.prompted_clip import export_merged

    if model_config is not None or prefix is not None:
        raise ConfigError("--model-config and --prefix do not apply to --format prompted")
    record = read_record(run_dir)
    device = torch.device("cpu")
    student, clip, record = load_prompted_run(run_dir, device, checkpoint)
    classes = ClassList(record["classnames"], record["templates"], str(Path(run_dir) / RECORD_NAME))
    cv = run_class_vectors(run_dir, record, classes, device)
    student.set_class_vectors(cv.vectors)
    out = Path(out_dir) if out_dir else Path(run_dir) / "export" / "prompted"
    return export_merged(student, out, image_size=clip.image_size, preprocess_cfg=clip.preprocess_cfg,
                         classnames=classes.names, templates=classes.templates, overwrite=overwrite)


RUN_EXPORTERS.register("prompted", export_prompted_run)

__all__ = ["evaluate_prompted", "export_prompted_run", "is_prompted_run", "load_prompted_run", "run_class_vectors"]

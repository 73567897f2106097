"""Zero-shot classification: class names × prompt templates → a text-tower classifier; top-1/top-5 and recall.

Task file (`zeroshot.json`, as written by `xmodal data synth-scenes`)::

    {"classnames": ["small red circle", ...], "templates": ["a picture of a {}", ...],
     "images": [{"filepath": "images/zeroshot/000003.png", "label": 0}, ...]}

Image paths are relative to the file (absolute paths are kept); `"image"` is accepted in place of `"filepath"`.
`--data imagefolder:PATH` reads an ImageNet-style folder instead (`xmodal.data.eval_sets`), with `--split`,
`--classnames` and `--templates` (CLIP_benchmark's `{c}` templates).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.commands import register_command
from xmodal.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class ZeroShotData:
    """Class names, prompt templates and labelled images of a zero-shot task."""

    classnames: list[str]
    templates: list[str]
    images: list[tuple[str, int]]
    source: str = "<memory>"
    name: str = ""
    split: str | None = None


def load_zeroshot_data(data: str | os.PathLike, *, split: str | None = None, classnames: str | None = None,
                       templates: str | None = None) -> ZeroShotData:
    """A zero-shot task from a named set (`imagefolder:PATH`, with its options) or a zeroshot.json / its folder."""
    from xmodal.data.eval_sets import ZEROSHOT, eval_set_names, load_eval_set

    named = load_eval_set(str(data), ZEROSHOT, split=split, classnames=classnames, templates=templates)
    if named is None:
        given = [f"--{k}" for k, v in {"split": split, "classnames": classnames, "templates": templates}.items()
                 if v is not None]
        if given:
            names = ", ".join(f"{n}:PATH" for n in eval_set_names(ZEROSHOT))
            raise ConfigError(f"{', '.join(given)} applies to named sets ({names}), not to the task file {data}; "
                              "drop it, or edit the file's classnames/templates")
        task = read_zeroshot_file(data)
        task.name = Path(task.source).parent.name
        return task
    return ZeroShotData(named.classnames, named.templates, named.items, named.source, named.name,
                        named.settings.get("split"))


def add_data_options(p: argparse.ArgumentParser) -> None:
    """--split/--classnames/--templates of a named zero-shot set (shared with commands that take over this one)."""
    p.add_argument("--split", default=None,
                   help="imagefolder: the split folder under PATH (default: PATH/val when present, else PATH)")
    p.add_argument("--classnames", default=None,
                   help="imagefolder: file with one class name per line, in sorted class-folder order, or "
                        "openai-imagenet (CLIP's ImageNet-1k names, in sorted WordNet-id folder order) (default: "
                        "PATH/classnames.txt, else the folder names with _ as spaces)")
    p.add_argument("--templates", default=None,
                   help="imagefolder: file with one prompt template per line, {c} for the class name, or a "
                        "built-in set (openai-imagenet, simple-imagenet) (default: PATH/templates.txt or "
                        "zeroshot_classification_templates.txt, else 'a photo of a {c}.')")


def data_from_args(args: argparse.Namespace) -> ZeroShotData:
    return load_zeroshot_data(args.data, split=getattr(args, "split", None),
                              classnames=getattr(args, "classnames", None), templates=getattr(args, "templates", None))


def data_fields(data: ZeroShotData) -> dict[str, Any]:
    """What results files say about the data: its name, split (named sets) and source."""
    out: dict[str, Any] = {"dataset": data.name, "data": data.source}
    if data.split:
        out["split"] = data.split
    return out


def read_zeroshot_file(path: str | os.PathLike) -> ZeroShotData:
    """Load a zero-shot task from a JSON file or a folder holding `zeroshot.json`."""
    path = Path(path)
    if path.is_dir():
        path = path / "zeroshot.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: zero-shot task file not found (generate one with `xmodal data synth-scenes`)") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with classnames, templates and images")
    for key in ("classnames", "templates", "images"):
        if key not in data:
            raise DataError(f"{path}: missing key '{key}' (a zero-shot task needs classnames, templates, images)")
    classnames, templates = [str(c) for c in data["classnames"]], [str(t) for t in data["templates"]]
    if not classnames:
        raise DataError(f"{path}: 'classnames' is empty")
    if not templates:
        raise DataError(f"{path}: 'templates' is empty")
    for i, t in enumerate(templates):
        if "{}" not in t:
            raise DataError(f"{path}: templates[{i}] '{t}' has no '{{}}' placeholder for the class name")
    root = path.parent
    images = []
    for i, item in enumerate(data["images"]):
        if not isinstance(item, Mapping):
            raise DataError(f"{path}: images[{i}] must be an object with 'filepath' and 'label'")
        rel = item.get("filepath", item.get("image"))
        if rel is None or "label" not in item:
            raise DataError(f"{path}: images[{i}] needs 'filepath' (or 'image') and 'label', has {sorted(item)}")
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(classnames):
            raise DataError(f"{path}: images[{i}] label {label!r} is not a class index in [0, {len(classnames)})")
        images.append((str(root / rel), int(label)))
    if not images:
        raise DataError(f"{path}: 'images' is empty; nothing to evaluate")
    return ZeroShotData(classnames, templates, images, str(path))


class ZeroShotImages(torch.utils.data.Dataset):
    """(image tensor, label) pairs read with PIL and the model's own eval transform."""

    def __init__(self, items: Sequence[tuple[str, int]], transform: Callable, source: str = ""):
        self.items = list(items)
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from xmodal.data.images import open_rgb

        path, label = self.items[i]
        try:
            image = open_rgb(path)  # a file or a tar shard's member
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{self.source}: image {i} ({path}) cannot be read: {e}") from e
        return self.transform(image), label


@torch.no_grad()
def build_zeroshot_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device = "cpu",
    classes_per_batch: int = 16,
) -> Tensor:
    """[D, C] classifier: each class's mean of L2-normalised template embeddings, renormalised (like open_clip)."""
    from open_clip import build_zero_shot_classifier

    if not classnames or not templates:
        raise DataError("zero-shot classification needs at least one class name and one template")
    was_training = model.training
    model.eval()
    try:
        weights = build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates), num_classes_per_batch=classes_per_batch,
            device=device,
        )
    finally:
        model.train(was_training)
    return weights.float()


def zeroshot_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """top-1, top-5 (top-C when fewer classes) and mean per-class recall over the classes present."""
    labels = labels.to(logits.device).long()
    n, c = logits.shape
    k = min(5, c)
    topk = logits.topk(k, dim=1).indices
    hit1 = topk[:, 0] == labels
    hit5 = (topk == labels[:, None]).any(dim=1)
    counts = torch.bincount(labels, minlength=c).float()
    correct = torch.bincount(labels[hit1], minlength=c).float()
    present = counts > 0
    return {
        "top1": hit1.float().mean().item(),
        "top5": hit5.float().mean().item(),
        "mean_per_class_recall": (correct[present] / counts[present]).mean().item(),
        "n": int(n),
        "classes": int(c),
    }


def _batches(loader: Iterable) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in loader:
        if isinstance(batch, Mapping):
            images, labels = batch["image"], batch["label"]
        else:
            images, labels = batch[0], batch[1]
        yield images, torch.as_tensor(labels)


@torch.no_grad()
def evaluate_zeroshot(
    model: nn.Module,
    classifier: Tensor,
    loader: Iterable,
    device: str | torch.device | None = None,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Classify every image of `loader` ((images, labels) or {"image", "label"} batches) with `classifier` [D, C]."""
    from xmodal.progress import progress as progress_bar

    device = torch.device(device) if device is not None else classifier.device
    classifier = classifier.to(device).float()
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    try:
        for images, labels in progress_bar(_batches(loader), desc="zero-shot", enabled=progress, unit="batch"):
            feats = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
            if feats.shape[1] != classifier.shape[0]:
                raise DataError(
                    f"image embeddings have width {feats.shape[1]} but the classifier is {list(classifier.shape)}; "
                    "build the classifier with the same model"
                )
            all_logits.append((feats @ classifier).cpu())
            all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise DataError("zero-shot evaluation got no images")
    return zeroshot_metrics(torch.cat(all_logits), torch.cat(all_labels))


def run_zeroshot(
    model: nn.Module,
    preprocess: Callable,
    tokenizer: Callable,
    data: ZeroShotData,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Build the classifier from `data`'s classes and templates, then evaluate on its images."""
    classifier = build_zeroshot_classifier(model, tokenizer, data.classnames, data.templates, device)
    loader = torch.utils.data.DataLoader(
        ZeroShotImages(data.images, preprocess, data.source), batch_size=batch_size, num_workers=num_workers
    )
    return evaluate_zeroshot(model, classifier, loader, device, progress=progress)


# ---------------------------------------------------------------------------------------------- command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="open_clip model name (e.g. ViT-B-32), hf-hub:org/repo, or a local open_clip folder "
                        "(such as an `xmodal export` output)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or a local checkpoint file")
    p.add_argument("--data", required=True, help="zeroshot.json or a folder holding it, or imagefolder:PATH "
                   "(ImageNet-style PATH/<split>/<class>/*.jpg)")
    add_data_options(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from xmodal.device import resolve_device
    from xmodal.io import atomic_write_json
    from xmodal.teachers.clip import load_open_clip

    data = data_from_args(args)
    device = resolve_device(args.device)
    loaded = load_open_clip(args.model, args.pretrained, device=str(device), frozen=True)
    metrics: dict[str, Any] = run_zeroshot(
        loaded.model, loaded.preprocess, loaded.tokenizer, data, device, args.batch_size, args.num_workers,
        progress=not args.no_progress,
    )
    metrics = {"task": "zeroshot_classification", "model": args.model, "pretrained": args.pretrained,
               **data_fields(data), **metrics}
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, metrics)
    return 0


register_command(
    "eval zeroshot", "zero-shot classification: top-1/top-5 and mean per-class recall", configure, run,
    description="Zero-shot classification with an open_clip model: class names × prompt templates build a "
    "classifier from the text tower; reports top-1, top-5 and mean per-class recall.",
)

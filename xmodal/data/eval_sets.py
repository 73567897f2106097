"""Named evaluation sets read from local copies: `--data NAME:PATH` picks a reader, a plain path keeps the
file formats of `xmodal.data.image_text` (retrieval) and `zeroshot.json` (zero-shot).

Built in: `coco-karpathy:PATH` and `flickr30k-karpathy:PATH` (Karpathy split JSON, retrieval) and
`imagefolder:PATH` (ImageNet-style class folders, zero-shot; the name CLIP_benchmark gives this layout).

Adding a reader from another module (e.g. `wds:PATTERN`)::

    from xmodal.data.eval_sets import RetrievalSet, register_eval_set

    @register_eval_set("wds", task="retrieval")
    def read_wds(path: str, *, split: str | None = None) -> RetrievalSet: ...

A reader takes the text after `NAME:` and keyword options (only those in its signature may be given: `split`,
and for zero-shot `classnames` and `templates` files); `split=None` means its own default. A retrieval reader
returns a `RetrievalSet` (one `ImageTextRecord` per image with all its captions, as `encode_image_text` takes);
a zero-shot reader returns a `ZeroShotSet` (`(image path, label)` items, class names and `{}` templates). Both
name the data files whose bytes define the set, and the settings (reader, split), so the embedding cache keys on
them. Register in a module listed in `READER_MODULES` (imported on the first lookup) or in a plugin package.

Karpathy splits: `--split train` reads `train` and `restval` images together. Karpathy's own neuraltalk groups
images strictly by their `split` field (`restval` apart), but the "Karpathy train split" that papers and the
later captioning code (ruotianluo/ImageCaptioning.pytorch: "train/restval is train") use is both: 113,287 COCO
images. `--split restval` reads restval alone; `val` and `test` are as written (COCO test: 5000 images, 25,010
captions; Flickr30k test: 1000 images, 5000 captions).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.data.image_text import ImageTextRecord
from xmodal.errors import ConfigError, DataError
from xmodal.fingerprint import DataIdentity, data_identity
from xmodal.registry import Registry, suggest

log = logging.getLogger(__name__)

RETRIEVAL, ZEROSHOT = "retrieval", "zeroshot"
TASKS = (RETRIEVAL, ZEROSHOT)
COMMAND = {RETRIEVAL: "xmodal eval retrieval", ZEROSHOT: "xmodal eval zeroshot"}
PLAIN = {RETRIEVAL: "a CSV/TSV/JSON-lines image-text file", ZEROSHOT: "a zeroshot.json (or a folder holding one)"}

# modules that register more readers; imported on the first lookup (keeps the core free of their dependencies)
READER_MODULES: tuple[str, ...] = ("xmodal.data.shards",)  # wds:PATTERN

# image suffixes an image folder reads (torchvision's ImageFolder list)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_TEMPLATE = "a photo of a {c}."
CLASSNAMES_FILES = ("classnames.txt",)
TEMPLATES_FILES = ("templates.txt", "zeroshot_classification_templates.txt")  # xmodal's, then CLIP_benchmark's


# ---------------------------------------------------------------------------------------------- set types


@dataclass
class RetrievalSet:
    """Images with all their captions, plus what identifies the set (for the embedding cache and the results).

    `name` is what results call it ("coco-karpathy/test"); `source` the resolved file or folder; `files` the data
    files whose content defines it; `settings` what else selects it (reader, split).
    """

    name: str
    records: list[ImageTextRecord]
    source: str
    files: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> DataIdentity:
        """Content of `files`, every image's path/size/mtime and `settings` (a plain file: the file and images)."""
        return data_identity(self.files, media=_media([r.image for r in self.records]), **self.settings)

    @property
    def slot(self) -> str:
        """Where the set comes from: cache entries of the same slot and model under another key are stale."""
        if not self.settings:
            return self.source
        return self.source + "|" + ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))


def _media(refs: Sequence[str]) -> list[str]:
    """The files holding the images (a shard once for all its members), in first-seen order."""
    from xmodal.data.images import ref_file

    return list(dict.fromkeys(ref_file(r) for r in refs))


@dataclass
class ZeroShotSet:
    """Labelled images, class names in label order and prompt templates in `str.format` form (one `{}`)."""

    name: str
    classnames: list[str]
    templates: list[str]
    items: list[tuple[str, int]]
    source: str
    files: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> DataIdentity:
        return data_identity(self.files, media=_media([p for p, _ in self.items]), classnames=self.classnames,
                             templates=self.templates, **self.settings)


@dataclass(frozen=True)
class EvalSetReader:
    """A registered reader: `read(path, **options)` gives a RetrievalSet or ZeroShotSet, for the tasks it serves."""

    name: str
    tasks: tuple[str, ...]
    read: Callable[..., RetrievalSet | ZeroShotSet]

    @property
    def options(self) -> list[str]:
        params = list(inspect.signature(self.read).parameters.values())[1:]
        return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "task"]

    @property
    def takes_task(self) -> bool:
        """A reader serving several tasks learns which one it reads for through a `task` keyword."""
        return "task" in inspect.signature(self.read).parameters

    def load(self, path: str, task: str, **options: Any) -> RetrievalSet | ZeroShotSet:
        """Read the set at `path`; options left at None are not passed, the others must be ones the reader takes."""
        given = {k: v for k, v in options.items() if v is not None}
        for key in given:
            if key not in self.options:
                flag = "--" + key.replace("_", "-")
                takes = ", ".join("--" + o.replace("_", "-") for o in self.options) or "no options"
                raise ConfigError(f"{flag} does not apply to {self.name}:PATH (it takes {takes}); drop {flag}")
        result = self.read(path, **given, **({"task": task} if self.takes_task else {}))
        want = RetrievalSet if task == RETRIEVAL else ZeroShotSet
        if not isinstance(result, want):
            raise TypeError(f"evaluation set reader {self.name!r} returned {type(result).__name__} for a {task} "
                            f"task; it must return {want.__name__}")
        return result


EVAL_SETS: Registry[EvalSetReader] = Registry("evaluation set")


def register_eval_set(name: str, *, task: str | Sequence[str], override: bool = False):
    """Decorator: register `fn(path, *, split=None, ...)` as `--data NAME:PATH` for `task` (retrieval/zeroshot)."""
    tasks = (task,) if isinstance(task, str) else tuple(task)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"evaluation set {name!r}: task {t!r} is not one of {', '.join(TASKS)}")
    if not re.fullmatch(r"[a-z][a-z0-9_.+-]+", name):
        raise ValueError(f"evaluation set name {name!r} must be lowercase letters, digits and _ . + - (2+ chars)")

    def add(fn: Callable[..., RetrievalSet | ZeroShotSet]):
        EVAL_SETS.register(name, EvalSetReader(name, tasks, fn), override=override)
        return fn

    return add


def _import_reader_modules() -> None:
    for module in READER_MODULES:
        importlib.import_module(module)


def eval_set_names(task: str | None = None) -> list[str]:
    """Registered set names, optionally only those serving `task`."""
    _import_reader_modules()
    return [n for n in EVAL_SETS.names() if task is None or task in EVAL_SETS.get(n).tasks]


_SPEC = re.compile(r"([A-Za-z][A-Za-z0-9_.+-]+):(.*)", re.DOTALL)


def split_data_spec(spec: str, task: str) -> tuple[EvalSetReader, str] | None:
    """(reader, path) for `NAME:PATH` with a registered NAME serving `task`; None for a plain path.

    A one-letter prefix (a Windows drive) and an existing file whose name holds a colon stay plain paths; an
    unknown NAME that is not a file is an error listing the known names.
    """
    m = _SPEC.fullmatch(str(spec))
    if m is None:
        return None
    name, path = m.group(1), m.group(2)
    _import_reader_modules()
    if name not in EVAL_SETS:
        if os.path.exists(spec) or "://" in spec:
            return None
        known = eval_set_names(task)
        hint = suggest(name, known) or next((f" (did you mean '{k}'?)" for k in known if k.startswith(name.lower())),
                                            "")
        raise ConfigError(
            f"--data {spec}: unknown evaluation set {name!r}{hint}; {COMMAND[task]} reads "
            f"{', '.join(f'{n}:PATH' for n in known) or 'no named sets'} or {PLAIN[task]}"
        )
    reader = EVAL_SETS.get(name)
    if task not in reader.tasks:
        known = eval_set_names(task)
        other = " / ".join(COMMAND[t] for t in reader.tasks)
        raise ConfigError(
            f"--data {spec}: {name} is a {' and '.join(reader.tasks)} set (use it with {other}); {COMMAND[task]} "
            f"reads {', '.join(f'{n}:PATH' for n in known) or 'no named sets'} or {PLAIN[task]}"
        )
    if not path.strip():
        raise ConfigError(f"--data {spec}: give the path after '{name}:', e.g. {name}:/data/{name}")
    return reader, os.path.expanduser(path)


def load_eval_set(spec: str, task: str, **options: Any) -> RetrievalSet | ZeroShotSet | None:
    """The named set `spec` (NAME:PATH) read with `options`, or None when `spec` is a plain path."""
    named = split_data_spec(spec, task)
    if named is None:
        return None
    reader, path = named
    return reader.load(path, task, **options)


def open_retrieval_set(spec: str | os.PathLike, *, split: str | None = None, image_key: str | None = None,
                       caption_key: str | None = None, sep: str | None = None, **options: Any) -> RetrievalSet:
    """A retrieval set from `NAME:PATH` or a plain image-text file (read with `read_records` and its keys)."""
    named = split_data_spec(str(spec), RETRIEVAL)
    if named is not None:
        for flag, value in (("--image-key", image_key), ("--caption-key", caption_key), ("--sep", sep)):
            if value is not None:
                raise ConfigError(f"{flag} applies to a CSV/TSV/JSON-lines file, not to {named[0].name}:PATH; "
                                  f"drop {flag}")
        result = named[0].load(named[1], RETRIEVAL, split=split, **options)
        assert isinstance(result, RetrievalSet)
        return result
    given = [f"--{k.replace('_', '-')}" for k, v in {"split": split, **options}.items() if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} applies to named sets ({', '.join(eval_set_names(RETRIEVAL))}"
                          f":PATH), not to the file {spec}; drop it or name the set")
    from xmodal.data.image_text import read_records

    path = Path(spec)
    records = read_records(path, image_key=image_key, caption_key=caption_key, sep=sep)
    return RetrievalSet(path.stem, records, str(path.resolve()), {"data": str(path)})


# ---------------------------------------------------------------------------------------------- Karpathy


@dataclass
class KarpathyRecord(ImageTextRecord):
    """An image of a Karpathy split file; `where` names the file and the entry."""

    entry: str = ""

    @property
    def where(self) -> str:
        return f"{self.source}: {self.entry}"


KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",), "test": ("test",)}


@dataclass(frozen=True)
class KarpathyLayout:
    """Where one Karpathy data set keeps its JSON and images."""

    name: str  # the reader name, e.g. coco-karpathy
    dataset: str  # the file's "dataset" value
    json_name: str
    image_dirs: tuple[str, ...]  # folders under the root to try, in order ("" = the root itself)
    use_filepath: bool  # images at root/<filepath>/<filename> (COCO) instead of root/<dir>/<filename>


COCO = KarpathyLayout("coco-karpathy", "coco", "dataset_coco.json", ("",), True)
FLICKR30K = KarpathyLayout("flickr30k-karpathy", "flickr30k", "dataset_flickr30k.json", ("", "flickr30k-images"),
                           False)


def _karpathy_json(path: Path, layout: KarpathyLayout) -> Path:
    if path.is_dir():
        candidate = path / layout.json_name
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("dataset_*.json"))
            hint = f" (it holds {', '.join(found)})" if found else ""
            raise DataError(f"{path}: no {layout.json_name} in this folder{hint}; give {layout.name}:FILE.json or "
                            f"put Karpathy's {layout.json_name} (caption_datasets.zip) in the folder")
        return candidate
    if not path.is_file():
        raise DataError(f"{path}: not found; give {layout.name}:PATH with PATH the Karpathy split file "
                        f"{layout.json_name} or the folder holding it and the images")
    return path


def read_karpathy(path: str | os.PathLike, layout: KarpathyLayout, split: str | None = None,
                  image_root: str | os.PathLike | None = None) -> RetrievalSet:
    """The `split` images of a Karpathy split file with all their `raw` captions (stripped), in file order."""
    split = split or "test"
    if split not in KARPATHY_SPLITS:
        raise ConfigError(f"--split {split!r}{suggest(split, list(KARPATHY_SPLITS))} is not a Karpathy split; use "
                          f"one of {', '.join(KARPATHY_SPLITS)} (train includes restval)")
    file = _karpathy_json(Path(path), layout)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}); is it Karpathy's "
                        f"{layout.json_name}?") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        hint = (" (this looks like a COCO annotation file; use Karpathy's dataset_coco.json from "
                "caption_datasets.zip)" if isinstance(data, dict) and "annotations" in data else "")
        raise DataError(f"{file}: no 'images' list{hint}; a Karpathy split file is "
                        '{"images": [{"filename", "split", "sentences": [{"raw": ...}]}, ...], "dataset": ...}')
    named = data.get("dataset")
    if named is not None and named != layout.dataset:
        other = {"coco": COCO.name, "flickr30k": FLICKR30K.name}.get(str(named))
        fix = f"use {other}:{path}" if other else f"give {layout.name}:PATH the {layout.json_name} file"
        raise DataError(f"{file}: 'dataset' is {named!r}, not {layout.dataset!r}; {fix}")
    wanted = KARPATHY_SPLITS[split]
    chosen: list[tuple[int, dict]] = []
    counts: dict[str, int] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise DataError(f"{file}: images[{i}] is a {type(img).__name__}, not an object")
        for key in ("filename", "split", "sentences"):
            if key not in img:
                raise DataError(f"{file}: images[{i}] has no {key!r} (keys: {', '.join(sorted(img))}); every "
                                "Karpathy image entry needs filename, split and sentences")
        counts[img["split"]] = counts.get(img["split"], 0) + 1
        if img["split"] in wanted:
            chosen.append((i, img))
    if not chosen:
        have = ", ".join(f"{k} ({v})" for k, v in sorted(counts.items())) or "none"
        raise DataError(f"{file}: no images in split {split!r}; the file's splits (images): {have}")
    root = Path(image_root) if image_root is not None else file.parent
    sub = _find_image_dir(file, root, layout, chosen[0])
    records: list[ImageTextRecord] = []
    empty = 0
    for i, img in chosen:
        folder = img.get("filepath", "") if layout.use_filepath else sub
        entry = f"images[{i}] ({img['filename']})"
        captions = []
        if not isinstance(img["sentences"], list) or not img["sentences"]:
            raise DataError(f"{file}: {entry} has no sentences; every image needs its captions in 'sentences'")
        for j, sent in enumerate(img["sentences"]):
            if not isinstance(sent, dict) or not isinstance(sent.get("raw"), str):
                keys = ", ".join(sorted(sent)) if isinstance(sent, dict) else type(sent).__name__
                raise DataError(f"{file}: {entry} sentences[{j}] has no 'raw' text (has: {keys}); Karpathy "
                                "sentences are {\"raw\": \"...\", \"tokens\": [...]}: restore 'raw'")
            captions.append(sent["raw"].strip())
            empty += not captions[-1]
        ref = os.path.normpath(os.path.join(folder, img["filename"]))
        records.append(KarpathyRecord(str(root / ref), captions, i, str(file), ref, [i] * len(captions), entry))
    if empty:
        log.warning("%s: %d empty caption(s) in split %s; they are kept so caption counts match the split",
                    file, empty, split)
    settings = {"reader": layout.name, "split": split}
    return RetrievalSet(f"{layout.name}/{split}", records, str(file.resolve()), {"data": str(file)}, settings)


def _find_image_dir(file: Path, root: Path, layout: KarpathyLayout, first: tuple[int, dict]) -> str:
    """The image folder under `root` that holds the split's first image (Flickr30k: the root or flickr30k-images)."""
    i, img = first
    if layout.use_filepath:
        tried = [root / img.get("filepath", "") / img["filename"]]
        if tried[0].is_file():
            return ""
    else:
        tried = [root / d / img["filename"] for d in layout.image_dirs]
        for d, p in zip(layout.image_dirs, tried):
            if p.is_file():
                return d
    raise DataError(
        f"{file}: images[{i}] ({img['filename']}) is not at {' or '.join(map(str, tried))}; put the images "
        f"there or pass --image-root DIR (the folder holding {'<filepath>/' if layout.use_filepath else ''}"
        f"{img['filename']})"
    )


@register_eval_set(COCO.name, task=RETRIEVAL)
def read_coco_karpathy(path: str, *, split: str | None = None,
                       image_root: str | None = None) -> RetrievalSet:
    """COCO captions, Karpathy split (dataset_coco.json); images at ROOT/<filepath>/<filename>."""
    return read_karpathy(path, COCO, split, image_root)


@register_eval_set(FLICKR30K.name, task=RETRIEVAL)
def read_flickr30k_karpathy(path: str, *, split: str | None = None,
                            image_root: str | None = None) -> RetrievalSet:
    """Flickr30k, Karpathy split (dataset_flickr30k.json); images at ROOT/<filename> or ROOT/flickr30k-images/."""
    return read_karpathy(path, FLICKR30K, split, image_root)


# ---------------------------------------------------------------------------------------------- image folders


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-blank lines of a text file, stripped (CLIP_benchmark's classnames.txt / templates .txt)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} file as UTF-8") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: the {what} file is empty; write one per line")
    return lines


def read_templates(path: str | os.PathLike) -> list[str]:
    """CLIP_benchmark templates (one per line, `{c}` for the class name) in `str.format` form with `{}`."""
    return [format_template(t, f"{path}:{i}") for i, t in enumerate(read_lines(path, "templates"), 1)]


def format_template(template: str, where: str) -> str:
    """`a photo of a {c}.` → `a photo of a {}.` (other braces kept literally)."""
    if "{c}" not in template:
        hint = " (write {c} where the class name goes, CLIP_benchmark style, not {})" if "{}" in template else ""
        raise DataError(f"{where}: template {template!r} has no {{c}} placeholder for the class name{hint}")
    return template.replace("{", "{{").replace("}", "}}").replace("{{c}}", "{}")


BUILTIN_TEMPLATES: dict[str, Callable[[], list[str]]] = {
    # open_clip's CLIP templates (its callables applied to "{c}"): 80 for ImageNet, and the 2 simple ones
    "openai-imagenet": lambda: [t("{c}") for t in _open_clip_templates("OPENAI_IMAGENET_TEMPLATES")],
    "simple-imagenet": lambda: [t("{c}") for t in _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES")],
}


BUILTIN_CLASSNAMES: dict[str, Callable[[], list[str]]] = {
    # ImageNet-1k in sorted WordNet-id order, which is the sorted order of ImageNet's class folders (n01440764, ...)
    "openai-imagenet": lambda: list(_open_clip_templates("IMAGENET_CLASSNAMES")),
}


def _open_clip_templates(name: str) -> Sequence[Any]:
    from open_clip import zero_shot_metadata

    return getattr(zero_shot_metadata, name)


def _has_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
    return found


def _first_existing(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


def names_and_templates(root: Path, default_names: list[str], classnames: str | None, templates: str | None,
                        classes: str, fix: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(class names, `{}` templates, files used) of a zero-shot set under `root`: `classnames` (a file or built-in
    name), else root/classnames.txt, else `default_names`; `templates` (a file or built-in set), else
    root/templates.txt or zeroshot_classification_templates.txt, else "a photo of a {c}.". `classes` says what
    the names must match (for the error), `fix` how to make them match."""
    files_used: dict[str, str] = {}
    builtin = classnames in BUILTIN_CLASSNAMES
    names_file = Path(classnames) if classnames else _first_existing(root, CLASSNAMES_FILES)
    if names_file is not None:
        names = BUILTIN_CLASSNAMES[classnames]() if builtin else read_lines(names_file, "class names")
        if len(names) != len(default_names):
            raise DataError(f"{names_file}: {len(names)} class names for {classes}; {fix}")
        if not builtin:
            files_used["classnames"] = str(names_file)
    else:
        names = list(default_names)
    if templates in BUILTIN_TEMPLATES:
        prompt_list = [format_template(t, f"built-in templates {templates}") for t in BUILTIN_TEMPLATES[templates]()]
    else:
        templates_file = Path(templates) if templates else _first_existing(root, TEMPLATES_FILES)
        if templates_file is not None:
            if not templates_file.is_file() and templates:
                raise DataError(f"{templates_file}: templates file not found; give a file with one template per "
                                f"line ({{c}} for the class name) or a built-in set: {', '.join(BUILTIN_TEMPLATES)}")
            prompt_list = read_templates(templates_file)
            files_used["templates"] = str(templates_file)
        else:
            prompt_list = [format_template(DEFAULT_TEMPLATE, "default template")]
    return names, prompt_list, files_used


@register_eval_set("imagefolder", task=ZEROSHOT)
def read_imagefolder(path: str, *, split: str | None = None, classnames: str | None = None,
                     templates: str | None = None) -> ZeroShotSet:
    """ImageNet-style PATH/<split>/<class>/*.jpg (or PATH/<class>/ without split folders): labels follow the sorted
    class folders. Class names: `classnames` file or built-in name, PATH/classnames.txt, else folder names (`_` →
    space).
    Templates (`{c}`): `templates` file or built-in name, PATH/templates.txt or zeroshot_classification_templates.txt,
    else "a photo of a {c}.". Without `split`, PATH/val is read when it exists, else PATH itself."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; give imagefolder:PATH with PATH/<split>/<class>/*.jpg")
    if split is not None:
        folder = root / split
        if not folder.is_dir():
            subs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise DataError(f"{root}: no split folder {split!r} (it holds: {', '.join(subs[:10]) or 'nothing'}"
                            f"{', ...' if len(subs) > 10 else ''}); pick one with --split, or drop --split when "
                            "PATH holds the class folders directly")
    else:
        folder = root / "val" if (root / "val").is_dir() else root
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders; an image folder is <split>/<class>/<images>")
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        files = _has_images(folder / name)
        if not files:
            raise DataError(f"{folder / name}: class folder with no images ({', '.join(IMAGE_SUFFIXES)}); add its "
                            "images or remove the folder (labels follow the sorted class folders)")
        items.extend((f, label) for f in files)
    names, prompt_list, files_used = names_and_templates(
        root, [c.replace("_", " ") for c in classes], classnames, templates,
        f"{len(classes)} class folders in {folder} (first {classes[0]!r}, last {classes[-1]!r})",
        "write one name per class folder, in sorted folder order")
    split_name = folder.name if folder != root else None
    title = root.resolve().name + (f"/{split_name}" if split_name else "")
    settings = {"reader": "imagefolder", "split": split_name}
    return ZeroShotSet(title, names, prompt_list, items, str(folder.resolve()), files_used, settings)


__all__ = [
    "EVAL_SETS", "READER_MODULES", "EvalSetReader", "KarpathyRecord", "RetrievalSet", "ZeroShotSet",
    "eval_set_names", "format_template", "load_eval_set", "names_and_templates", "open_retrieval_set",
    "read_coco_karpathy", "read_flickr30k_karpathy", "read_imagefolder", "read_karpathy", "read_lines",
    "read_templates",
    "register_eval_set", "split_data_spec",
]

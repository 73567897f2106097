"""The `prompt_distill` job (PromptKD): a frozen student CLIP learns deep visual prompts and a projector so that its
class distribution over the teacher's stored class vectors matches the teacher's, from unlabelled images.

Run folder: `config.yaml`, `metrics.jsonl`, `checkpoints/` (the engine's), `class_vectors/` (W_T, unless
`class_vectors` names a file), `selection.json` + `best_prompts.safetensors` (the validation choice),
`prompts.safetensors` (the chosen prompts + projector, a small file), `prompted_student.json` (what
`xmodal eval zeroshot --model RUN` and `xmodal export RUN --format prompted` rebuild the student from) and
`results.json` (base / novel / HM accuracy on the test images of the teacher, the student zero-shot and the
prompt-distilled student). Every check of the class list, the images and the settings runs before anything is
written there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xmodal.adapters import clip_embed_dim
from xmodal.config import register_job
from xmodal.distributed import is_main_process
from xmodal.engine.cache import CacheSource, register_cache_source
from xmodal.engine.ddp import init_distributed
from xmodal.errors import ConfigError, DataError
from xmodal.fingerprint import data_identity, fingerprint
from xmodal.io import atomic_write_json
from xmodal.openclip import ClipBundle
from xmodal.tasks.prompt.classes import (
    ClassList,
    ClassVectors,
    base_novel_split,
    obtain_class_vectors,
    read_class_file,
)
from xmodal.tasks.prompt.config import PromptDistillConfig
from xmodal.tasks.prompt.data import (
    ImageItem,
    PromptImages,
    check_readable,
    read_images,
    read_task_items,
    split_items,
)
from xmodal.tasks.prompt.evaluate import Selection, agreement, base_novel_metrics, embed_items
from xmodal.tasks.prompt.models import PROMPT_LOSS_HINT, PROMPT_PRODUCES, PromptTeacher, teacher_logit_scale

log = logging.getLogger(__name__)

RECORD_NAME = "prompted_student.json"
PROMPTS_NAME = "prompts.safetensors"
RECORD_FORMAT = "xmodal-prompted-student"


# ---------------------------------------------------------------------------------------------- data


@dataclass
class PromptData:
    """Resolved images and classes: training images (labels kept when known), validation and test images."""

    classes: ClassList
    train: list[ImageItem]
    val: list[ImageItem]
    test: list[ImageItem]
    root: Path | None = None
    captions: Path | None = None
    train_source: str = ""

    @property
    def val_labelled(self) -> bool:
        return bool(self.val) and all(it.label is not None for it in self.val)


def _same_classes(names: list[str] | None, classes: ClassList, where: str) -> None:
    if names is not None and list(names) != list(classes.names):
        raise ConfigError(
            f"{where}: its labels index the classes {names[:4]}{'...' if len(names) > 4 else ''} ({len(names)}), "
            f"but the class list ({classes.source}) is {classes.names[:4]}{'...' if len(classes) > 4 else ''} "
            f"({len(classes)}); use one class list for training, validation and test"
        )


def _synthetic(cfg: PromptDistillConfig, root: Path | None) -> None:
    s = cfg.data.synthetic
    if s is None:
        return
    if root is None:
        raise ConfigError("data.synthetic needs data.root: the folder to generate the synthetic world into")
    from xmodal.data.scenes import generate_scene_dataset

    generate_scene_dataset(root, s.train, s.val, s.test, seed=s.seed, image_size=s.image_size,
                           captions_per_image=s.captions_per_image, zeroshot_per_class=s.zeroshot_per_class,
                           progress=False)


def _synthetic_items(root: Path, classes: ClassList, split: str) -> list[ImageItem]:
    """The single-object images of a split of the synthetic world, labelled by their scene (the labels are used
    only where something asks for them: validation, `classes.train: base`, a cross-entropy term)."""
    from xmodal.data.scenes import load_world, zeroshot_task

    task = zeroshot_task(load_world(root), split)
    _same_classes(task.classnames, classes, f"{root} ({split} split)")
    return [ImageItem(str((root / p).resolve()), p, int(y)) for p, y in sorted(task.labels.items())]


def resolve_classes(cfg: PromptDistillConfig, root: Path | None) -> ClassList:
    """The class list and templates: `classes.file` (default: data.test), with `classes.names`/`templates` replacing
    the file's; checked (non-empty, no repeats, every template with a `{}`)."""
    c = cfg.classes

    def path(name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() or root is None else root / p

    source = c.file or (cfg.data.test if c.names is None or c.templates is None else None)
    base = read_class_file(path(source)) if source else None
    names = c.names if c.names is not None else (base.names if base else None)
    templates = c.templates if c.templates is not None else (base.templates if base else None)
    if names is None or templates is None:
        raise ConfigError("classes: give classes.file (a JSON with classnames and templates), or classes.names and "
                          "classes.templates, or a data.test task file to take them from")
    where = "classes" if base is None or (c.names is not None and c.templates is not None) else base.source
    return ClassList(list(names), list(templates), where).check()


def resolve_prompt_data(cfg: PromptDistillConfig) -> PromptData:
    """Generate the synthetic world when configured, read the class list and every image set, and check the
    images can be read (with on_error: raise), all before anything is written to the run folder."""
    d = cfg.data
    root = Path(d.root) if d.root else None
    _synthetic(cfg, root)

    def path(name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() or root is None else root / p

    classes = resolve_classes(cfg, root)
    if d.train:
        train_source = str(path(d.train))
        names, items = read_images(path(d.train))
        _same_classes(names, classes, train_source)
    elif d.synthetic is not None:
        train_source = f"{root} (single-object images of the train split)"
        items = _synthetic_items(root, classes, "train")
    else:
        raise ConfigError("data.train: give an image folder (no labels needed) or a task JSON of training images")
    if d.val:
        names_v, val = read_task_items(path(d.val))
        _same_classes(names_v, classes, str(path(d.val)))
    elif d.synthetic is not None:
        val = _synthetic_items(root, classes, "val")
    else:
        items, val = split_items(items, d.val_fraction)
    test: list[ImageItem] = []
    if d.test:
        names_t, test = read_task_items(path(d.test))
        _same_classes(names_t, classes, str(path(d.test)))
    if d.on_error == "raise":
        for what, group in (("data.train", items), ("validation images", val), ("data.test", test)):
            if group:
                check_readable(group, what)
    captions = path(d.captions) if d.captions else None
    return PromptData(classes, items, val, test, root, captions, train_source)


# ---------------------------------------------------------------------------------------------- models


def _caption_paths(cfg: PromptDistillConfig, data: PromptData):
    from xmodal.tasks.clip.config import DataConfig
    from xmodal.tasks.clip.job import DataPaths

    if data.captions is None or not data.captions.is_file():
        raise ConfigError(f"teacher.train / student.train train a CLIP on image captions, and data.captions "
                          f"({data.captions}) is not a file; give an image-caption CSV or JSON-lines file")
    data_cfg = DataConfig(train=str(data.captions), val=None, test=None, zeroshot=None, root=None)
    return DataPaths(data.captions, None, None, None), data_cfg


def _pretrain_dir(cfg: PromptDistillConfig) -> Path:
    return Path(cfg.pretrain_dir) if cfg.pretrain_dir else Path(cfg.run_dir) / "pretrained"


def obtain_teacher_model(cfg: PromptDistillConfig, data: PromptData, device: torch.device) -> ClipBundle:
    """The teacher CLIP: loaded, or (with teacher.train) trained on the captions once and reused after."""
    from xmodal.tasks.clip.job import load_clip, obtain_teacher

    if cfg.teacher.train is None:
        return load_clip(cfg.teacher, device)
    paths, data_cfg = _caption_paths(cfg, data)
    return obtain_teacher(cfg.teacher, paths, data_cfg, _pretrain_dir(cfg), device)


def obtain_student_clip(cfg: PromptDistillConfig, data: PromptData | None, device: torch.device) -> ClipBundle:
    """The student's frozen CLIP: by name/folder, from a clip_distill run, or trained on the captions first."""
    from xmodal.tasks.clip.config import TeacherConfig
    from xmodal.tasks.clip.job import load_clip, obtain_teacher

    s = cfg.student
    if s.run is not None:
        from xmodal.students.export import load_clip_checkpoint

        return load_clip_checkpoint(s.run, device=str(device))
    spec = TeacherConfig(model=s.model, pretrained=s.pretrained, model_cfg=s.model_cfg, train=s.train)
    if s.train is None:
        if s.model_cfg is not None:
            log.warning("student: built from model_cfg with random weights and no student.train; its image tower "
                        "is noise that prompts cannot fix. Give pretrained weights or a student.train block")
        return load_clip(spec, device)
    paths, data_cfg = _caption_paths(cfg, data)
    return obtain_teacher(spec, paths, data_cfg, _pretrain_dir(cfg), device)


def model_source(bundle: ClipBundle, run: str | None = None) -> dict[str, Any]:
    """How to load this CLIP again (for the run record): a name/folder + pretrained, or a clip run folder."""
    if run is not None:
        return {"run": str(Path(run).resolve())}
    name = bundle.name
    if name and Path(name).exists():
        name = str(Path(name).resolve())
    pretrained = bundle.pretrained
    if pretrained and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    if name == "open_clip" and bundle.model_cfg is not None:
        return {"model_cfg": bundle.model_cfg}  # random weights: recorded, but nothing to reload them from
    return {"model": name, "pretrained": pretrained}


def freeze(bundle: ClipBundle) -> ClipBundle:
    bundle.model.eval().requires_grad_(False)
    return bundle


def build_prompted_student(cfg: PromptDistillConfig, clip: ClipBundle, teacher_dim: int, device: torch.device):
    """The prompted student (kind prompted_clip) over `clip`, with prompts from `student.prompts_file` if given."""
    from xmodal.models import create_student

    layers = len(clip.model.visual.transformer.resblocks) if hasattr(clip.model.visual, "transformer") else 0
    p = cfg.student.prompts
    spec = {"prompts": {"n": p.n, "depth": p.depth if p.depth is not None else layers, "init_std": p.init_std},
            "projector": cfg.student.projector}
    student = create_student(spec, clip.model, kind="prompted_clip", family="clip", teacher_dim=teacher_dim,
                             device=device)
    if cfg.student.prompts_file:
        student.load_prompts(cfg.student.prompts_file)
    return student


# ---------------------------------------------------------------------------------------------- the job


def _check_losses(cfg: PromptDistillConfig):
    from xmodal.losses import build_losses

    losses = build_losses(cfg.losses)
    losses.check_inputs(PROMPT_PRODUCES, PROMPT_PRODUCES, hint=PROMPT_LOSS_HINT)
    return losses


def _label_readers(losses) -> list[str]:
    """Labels of the configured losses that read class labels from the batch (prompt_kd's cross-entropy term)."""
    out = []
    for label, loss in zip(losses.labels, losses.losses):
        keys = loss.batch_keys() if callable(getattr(loss, "batch_keys", None)) else []
        if getattr(loss, "reads_labels", False) or "label" in keys:
            out.append(label)
    return out


def _train_items(data: PromptData, train_idx: list[int], base_only: bool) -> list[ImageItem]:
    """Training images; with `classes.train: base`, labelled images of novel classes are left out and labels are
    renumbered to the training classes."""
    if not base_only:
        return data.train
    position = {c: i for i, c in enumerate(train_idx)}
    kept = [dataclasses.replace(it, label=None if it.label is None else position[it.label])
            for it in data.train if it.label is None or it.label in position]
    if len(kept) < len(data.train):
        log.info("classes.train: base: %d labelled images of novel classes left out of training",
                 len(data.train) - len(kept))
    return kept


@register_job("prompt_distill", PromptDistillConfig,
              help="PromptKD: deep visual prompts + projector of a frozen student CLIP, from stored teacher class "
                   "vectors and unlabelled images; base/novel/HM results")
def run(cfg: PromptDistillConfig) -> dict[str, Any]:
    from xmodal.engine import Distiller

    device = init_distributed(cfg.train.device)
    losses = _check_losses(cfg)
    labelled_losses = _label_readers(losses)
    data = resolve_prompt_data(cfg)
    if labelled_losses and any(it.label is None for it in data.train):
        raise ConfigError(
            f"losses: {', '.join(labelled_losses)} read(s) class labels, but data.train ({data.train_source}) has "
            "none (an image folder); turn the cross-entropy term off (ce_weight: 0) or train on a labelled task file"
        )
    run_dir = Path(cfg.run_dir)
    base, _novel = base_novel_split(data.classes.names)
    train_idx = sorted(base) if cfg.classes.train == "base" else list(range(len(data.classes)))
    train_items = _train_items(data, train_idx, cfg.classes.train == "base")

    teacher = freeze(obtain_teacher_model(cfg, data, device))
    student_clip = freeze(obtain_student_clip(cfg, data, device))
    student = build_prompted_student(cfg, student_clip, clip_embed_dim(teacher.model), device)
    cv = obtain_class_vectors(teacher, data.classes, path=cfg.class_vectors, store_dir=run_dir / "class_vectors",
                              device=device)
    w_train = cv.vectors[train_idx]
    student.set_class_vectors(w_train)

    cache = None
    if cfg.teacher.cache:
        from xmodal.engine.cache import TeacherCache

        cache = TeacherCache(cfg.teacher.cache, fingerprint=cache_fingerprint(teacher, train_items))
    t_module = PromptTeacher(teacher.model.visual, w_train, teacher_logit_scale(teacher.model), cache=cache)
    t_module.to(device)
    views = [("image", student_clip.train_transform if cfg.data.augment else student_clip.eval_transform)]
    if cache is None:
        views.append(("teacher_image", teacher.eval_transform))
    dataset = PromptImages(train_items, views, seed=cfg.train.seed, labels=bool(labelled_losses),
                           on_error=cfg.data.on_error, source=data.train_source)

    selection, evaluator, holder = _selection(cfg, data, student, student_clip, teacher, t_module, cv, train_idx,
                                              device)
    distiller = Distiller(student, losses, dataset, cfg.train, run_dir, teacher=t_module, evaluator=evaluator,
                          config=cfg, teacher_fingerprint=cv.fingerprint, resume=cfg.resume)
    holder["distiller"] = distiller
    if selection is not None and cfg.resume:
        selection.restore()
    out = distiller.fit()

    if selection is not None and selection.step is not None:
        student.load_prompts(selection.prompts_path)
        log.info("chosen prompts: step %d (validation %s %.4f)", selection.step, selection.metric, selection.best)
    student.set_class_vectors(cv.vectors)
    results: dict[str, Any] = {
        "classes": len(data.classes), "train_classes": cfg.classes.train,
        "base_classes": [data.classes.names[i] for i in base],
        "novel_classes": [data.classes.names[i] for i in _novel],
        "step": out["step"],
        "selected": None if selection is None or selection.step is None else
        {"metric": selection.metric, "value": selection.best, "step": selection.step},
        "class_vectors": str(cv.path), "prompts": str(run_dir / PROMPTS_NAME),
    }
    if data.test:
        results.update(test_results(cfg, data, cv, student, student_clip, teacher, t_module, device))
    if is_main_process():
        student.save_prompts(run_dir / PROMPTS_NAME, {"step": results["selected"]["step"] if results["selected"]
                                                      else out["step"]})
        write_record(run_dir, cfg, teacher, student_clip, student, cv)
        atomic_write_json(run_dir / "results.json", results)
    return results


def _selection(cfg: PromptDistillConfig, data: PromptData, student, student_clip: ClipBundle, teacher: ClipBundle,
               t_module: PromptTeacher, cv: ClassVectors, train_idx: list[int], device: torch.device):
    """The validation evaluator that keeps the best prompts: (Selection, evaluator, holder) or (None, None, holder)
    when the final step is taken. `holder["distiller"]` must be set before training (the evaluator reads its step).

    Metrics: `hm` (labelled validation images of base and novel classes, over the full class vectors), `top1` (over
    the training classes), `agreement` (top class equal to the teacher's, over the training classes: no labels)."""
    holder: dict[str, Any] = {}
    metric = cfg.eval.select
    if metric == "last" or not data.val:
        if metric not in ("last", "auto"):
            raise ConfigError(f"eval.select: {metric} needs validation images (data.val or data.val_fraction > 0)")
        return None, None, holder
    if metric == "auto":
        metric = "hm" if data.val_labelled else "agreement"
    if metric in ("hm", "top1") and not data.val_labelled:
        raise ConfigError(f"eval.select: {metric} needs labelled validation images; these have no labels (use "
                          "agreement, or give data.val as a labelled task file)")
    val_items = data.val
    labels = None
    if metric == "hm":
        labels = torch.tensor([it.label for it in val_items])
        try:
            base_novel_metrics(torch.zeros(len(val_items), 1), labels, torch.zeros(len(data.classes), 1),
                               data.classes.names)
        except DataError as e:
            raise ConfigError(f"eval.select: hm on the validation images is not possible: {e}; use top1") from None
    else:
        keep = {c: i for i, c in enumerate(train_idx)}
        val_items = [it for it in val_items if it.label is None or it.label in keep]
        if not val_items:
            raise ConfigError("eval.select: no validation images of the training classes")
        if metric == "top1":
            labels = torch.tensor([keep[it.label] for it in val_items])
    w_train = cv.vectors[train_idx]
    teacher_logits = None
    if metric == "agreement":
        teacher_logits = embed_items(t_module.embed, val_items, teacher.eval_transform,
                                     batch_size=cfg.eval.batch_size, device=device, source="validation images")
        teacher_logits = teacher_logits @ w_train.t()
    selection = Selection(metric, Path(cfg.run_dir))

    def evaluate(model) -> dict[str, float]:
        emb = embed_items(model.encode_image, val_items, student_clip.eval_transform,
                          batch_size=cfg.eval.batch_size, device=device, source="validation images")
        if metric == "hm":
            m = base_novel_metrics(emb, labels, cv.vectors, data.classes.names)
            value, metrics = m["hm"], {"val_base": m["base"], "val_novel": m["novel"], "val_hm": m["hm"]}
        elif metric == "top1":
            value = float(((emb @ w_train.t()).argmax(1) == labels).float().mean())
            metrics = {"val_top1": value}
        else:
            value = agreement(emb @ w_train.t(), teacher_logits)
            metrics = {"val_agreement": value}
        if is_main_process():
            selection.update(value, holder["distiller"].step, model.save_prompts)
        return metrics

    return selection, evaluate, holder


def test_results(cfg: PromptDistillConfig, data: PromptData, cv: ClassVectors, student, student_clip: ClipBundle,
                 teacher: ClipBundle, t_module: PromptTeacher, device: torch.device) -> dict[str, Any]:
    """Base / novel / HM (and all-class) accuracy on the test images: the prompt-distilled student, and with
    eval.baselines the teacher (its image tower with the stored W_T) and the student CLIP zero-shot (its own
    text tower)."""
    from xmodal.tasks.zeroshot import build_zeroshot_classifier

    labels = torch.tensor([it.label for it in data.test])
    names = data.classes.names
    bs = cfg.eval.batch_size
    out: dict[str, Any] = {}
    was = student.training
    student.eval()
    try:
        emb = embed_items(student.encode_image, data.test, student_clip.eval_transform, batch_size=bs, device=device,
                          source="data.test")
    finally:
        student.train(was)
    out["prompt_distilled"] = base_novel_metrics(emb, labels, cv.vectors, names)
    if cfg.eval.baselines:
        emb_t = embed_items(t_module.embed, data.test, teacher.eval_transform, batch_size=bs, device=device,
                            source="data.test")
        out["teacher"] = base_novel_metrics(emb_t, labels, cv.vectors, names)
        clf = build_zeroshot_classifier(student_clip.model, student_clip.tokenizer, names, data.classes.templates,
                                        device).t().cpu()
        emb_s = embed_items(student_clip.model.encode_image, data.test, student_clip.eval_transform, batch_size=bs,
                            device=device, source="data.test")
        out["student_zeroshot"] = base_novel_metrics(emb_s, labels, clf, names)
    for name, m in out.items():
        log.info("test %s: base %.4f novel %.4f HM %.4f", name, m["base"], m["novel"], m["hm"])
    return out


def write_record(run_dir: Path, cfg: PromptDistillConfig, teacher: ClipBundle, student_clip: ClipBundle, student,
                 cv: ClassVectors) -> Path:
    """`prompted_student.json`: what rebuilds the prompted student without the job config."""
    record = {
        "format": RECORD_FORMAT, "version": 1,
        "student": model_source(student_clip, cfg.student.run), **student.describe(),
        "prompts": PROMPTS_NAME,
        "teacher": model_source(teacher), "teacher_fingerprint": teacher.fingerprint,
        "class_vectors": str(Path(cv.path).resolve()), "classnames": cv.classes.names,
        "templates": cv.classes.templates, "image_size": student_clip.image_size,
        "preprocess_cfg": student_clip.preprocess_cfg,
    }
    path = run_dir / RECORD_NAME
    atomic_write_json(path, json.loads(json.dumps(record, default=str)))
    return path


# ---------------------------------------------------------------------------------------------- teacher cache


def cache_fingerprint(teacher: ClipBundle, items: list[ImageItem]) -> str:
    """The teacher's image-tower outputs on these images: teacher identity + the images' paths, sizes and times."""
    return fingerprint(teacher.fingerprint, data=data_identity(media=[it.path for it in items],
                                                               keys=[it.key for it in items]))


@register_cache_source("prompt_distill")
def cache_source(cfg: PromptDistillConfig) -> CacheSource:
    """`xmodal cache CONFIG`: the teacher's normalised image embeddings of every training image."""
    from xmodal.engine.data import collate_samples

    device = init_distributed(cfg.train.device)
    data = resolve_prompt_data(cfg)
    base, _ = base_novel_split(data.classes.names)
    train_idx = sorted(base) if cfg.classes.train == "base" else list(range(len(data.classes)))
    items = _train_items(data, train_idx, cfg.classes.train == "base")
    teacher = freeze(obtain_teacher_model(cfg, data, device))
    module = PromptTeacher(teacher.model.visual, None, teacher_logit_scale(teacher.model))
    dataset = PromptImages(items, [("teacher_image", teacher.eval_transform)], on_error=cfg.data.on_error,
                           source=data.train_source)
    data_id = data_identity(media=[it.path for it in items], keys=[it.key for it in items])
    return CacheSource(module, dataset, fingerprint(teacher.fingerprint, data=data_id), collate_fn=collate_samples,
                       batch_size=cfg.train.batch_size, out_dir=cfg.teacher.cache, meta={"data": data.train_source},
                       data=data_id)


__all__ = ["PromptData", "cache_source", "resolve_prompt_data", "run", "test_results", "write_record"]

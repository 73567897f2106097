"""The `bev_distill` job: (train the BEV teacher,) then train a BEV student from it with UniDistill and score both.

Run folder: `config.yaml`, `metrics.jsonl`, `checkpoints/` (engine), `bev_detector.pt` (the student, for
`xmodal eval detection`), `results.json` (teacher and student test metrics with the NDS formula); a teacher
trained here lives in `teacher/<settings hash>/` (its own run folder plus `bev_detector.pt`) and is reused while
its config, the grid and the training scenes (by content) are unchanged.

Every map lies on `data.grid`: the job gives it to the detectors it builds, and refuses a loaded teacher on
another grid or with other classes. The student's distilled maps are projected into the teacher's widths
(`projection`), which is UniDistill's adaptation layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from xmodal.config import register_job, to_dict
from xmodal.data.bev import BEVSceneDataset, BEVWorldConfig, generate_bev_dataset
from xmodal.device import resolve_device, seed_everything
from xmodal.engine.cache import CacheSource, register_cache_source
from xmodal.errors import ConfigError, DataError
from xmodal.fingerprint import hash_json, model_fingerprint
from xmodal.io import atomic_write_json
from xmodal.models import create_student, create_teacher
from xmodal.nn.bev import BEV, BEV_BOX, BEV_ENCODER, BEVDetector, BEVDetectorConfig, save_detector
from xmodal.tasks.bev.config import BEVDataConfig, BEVDistillConfig, BEVEvalConfig, BEVTeacherConfig
from xmodal.tasks.bev.evaluate import evaluate_detection

log = logging.getLogger(__name__)

MODEL_FILE = "bev_detector.pt"
PRODUCES = {BEV: ("pooled", "tokens", "logits"), BEV_ENCODER: ("pooled", "tokens"), BEV_BOX: ("pooled", "tokens")}


# ---------------------------------------------------------------- data


@dataclass
class Splits:
    train: Path
    val: Path | None
    test: Path | None


def resolve_splits(cfg: BEVDataConfig) -> Splits:
    """Absolute split folders; writes synthetic-bev scenes into `root` first when configured."""
    root = Path(cfg.root) if cfg.root else None
    if cfg.synthetic is not None:
        if root is None:
            raise ConfigError("data.synthetic needs data.root: the folder to write the synthetic scenes into")
        s = cfg.synthetic
        world = BEVWorldConfig(x_range=cfg.grid.x_range, y_range=cfg.grid.y_range, objects=tuple(s.objects),
                               image_size=tuple(s.image_size), lidar_beams=s.lidar_beams,
                               lidar_azimuths=s.lidar_azimuths)
        for k, (name, n) in enumerate(((cfg.train, s.train), (cfg.val, s.val), (cfg.test, s.test))):
            if name is not None and n > 0:
                generate_bev_dataset(root / name, n, s.seed + k, world, progress=False)

    def path(name: str | None) -> Path | None:
        if name is None:
            return None
        p = Path(name)
        return p if p.is_absolute() or root is None else root / p

    out = Splits(path(cfg.train), path(cfg.val), path(cfg.test))
    if not (out.train / "dataset.json").is_file():
        raise ConfigError(f"data.train: {out.train} is not a BEV scene folder (no dataset.json); set data.root, "
                          "data.synthetic, or write one with `xmodal data synth-bev`")
    for name in ("val", "test"):
        p = getattr(out, name)
        if p is not None and not (p / "dataset.json").is_file():
            log.warning("data.%s: %s is not a BEV scene folder; skipping that split", name, p)
            setattr(out, name, None)
    return out


def scene_dataset(path: Path, cfg: BEVDataConfig) -> BEVSceneDataset:
    return BEVSceneDataset(path, cfg.grid, camera=cfg.camera)


def folder_digest(path: Path) -> str:
    """Content hash of a scene folder (every file under points/, images/, labels/ and dataset.json)."""
    h = hashlib.blake2b(digest_size=12)
    files = [path / "dataset.json"] + sorted(p for d in ("points", "images", "labels") for p in (path / d).rglob("*")
                                             if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_boxes_present(ds: BEVSceneDataset, what: str) -> int:
    """Nothing trains on nothing: the scenes must hold at least one box on the grid."""
    grid = ds.grid
    total = 0
    for sid in ds.ids:
        boxes, _, _ = ds.read_labels(sid)
        total += int(grid.contains(boxes[:, :2]).sum()) if len(boxes) else 0
    if total == 0:
        raise DataError(f"{what}: the {len(ds)} scenes in {ds.root} hold no box on the grid {grid.to_dict()}; "
                        "detection and the UniDistill losses need boxes (check the grid range and the labels)")
    return total


def eval_loader(path: Path | None, cfg: BEVDataConfig, batch_size: int) -> DataLoader | None:
    if path is None:
        return None
    ds = scene_dataset(path, cfg)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=ds.collate)


def on_data(model_cfg: BEVDetectorConfig, ds: BEVSceneDataset) -> BEVDetectorConfig:
    """The detector config on the data's grid and classes."""
    return dataclasses.replace(model_cfg, grid=ds.grid, classes=tuple(ds.classes))


def check_fits(model: BEVDetector, ds: BEVSceneDataset, who: str) -> None:
    if model.grid != ds.grid:
        raise ConfigError(f"the {who} works on the BEV grid {model.grid.to_dict()} but data.grid is "
                          f"{ds.grid.to_dict()}; teacher, student and data must share one grid")
    if tuple(model.config.classes) != tuple(ds.classes):
        raise ConfigError(f"the {who} detects {list(model.config.classes)} but the data's classes are "
                          f"{list(ds.classes)}")


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in ("mAP", "NDS")}


# ---------------------------------------------------------------- teacher


def teacher_recipe(cfg: BEVTeacherConfig) -> dict:
    """The settings that make the teacher what it is (where its outputs are cached is not one of them)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "cache"}


def teacher_folder(cfg: BEVTeacherConfig, data: BEVDataConfig, train: Path, run_dir: Path) -> Path:
    """`run_dir/teacher/<hash of recipe, grid, camera and training scenes' content>`."""
    key = hash_json({"teacher": teacher_recipe(cfg), "grid": data.grid.to_dict(), "camera": data.camera,
                     "data": folder_digest(train)})
    return run_dir / "teacher" / key


def obtain_teacher(cfg: BEVTeacherConfig, data: BEVDataConfig, splits: Splits, run_dir: Path,
                   eval_cfg: BEVEvalConfig) -> tuple[BEVDetector, Path]:
    """(teacher detector, its file): loaded from `path`, or trained on the training scenes (and reused later)."""
    from xmodal.engine import Distiller
    from xmodal.losses import build_losses

    train_ds = scene_dataset(splits.train, data)
    if cfg.path is not None:
        model = create_teacher({"kind": "bev_detector", "path": cfg.path}, family="bev")
        check_fits(model, train_ds, "teacher")
        return model, Path(cfg.path)
    folder = teacher_folder(cfg, data, splits.train, run_dir)
    model_file, marker = folder / MODEL_FILE, folder / "trained.json"
    if model_file.is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == folder.name:
        log.info("teacher: reusing the detector trained earlier in %s", model_file)
        return create_teacher({"kind": "bev_detector", "path": str(model_file)}, family="bev"), model_file
    check_boxes_present(train_ds, "teacher training data")
    seed_everything(cfg.train.seed)  # the same teacher whatever ran before in this process
    model = BEVDetector(on_data(cfg.model, train_ds))
    val = eval_loader(splits.val, data, eval_cfg.batch_size)
    evaluator = None
    if val is not None:
        def evaluator(m: BEVDetector) -> dict[str, float]:
            return _summary(evaluate_detection(m, val, train_ds.classes, decode=eval_cfg.decode,
                                               max_batches=eval_cfg.max_batches))
    log.info("teacher: training a %s-parameter %s detector for %d steps",
             f"{sum(p.numel() for p in model.parameters()):,}", cfg.model.sensor, cfg.train.steps)
    Distiller(model, build_losses(cfg.losses), train_ds, cfg.train, folder, evaluator=evaluator,
              config={"teacher": teacher_recipe(cfg), "grid": data.grid.to_dict()}, collate_fn=train_ds.collate,
              resume="auto").fit()
    save_detector(model, model_file, meta={"classes": list(train_ds.classes), "data": str(splits.train)})
    atomic_write_json(marker, {"key": folder.name, "model": str(model_file)})
    model.eval().requires_grad_(False)
    return model, model_file


def teacher_fingerprint(model: BEVDetector, data: BEVDataConfig, train: Path) -> str:
    """The teacher's identity for checkpoints and caches: weights, grid, camera and the training scenes' content."""
    return model_fingerprint(model, {"grid": data.grid.to_dict(), "camera": data.camera,
                                     "data": folder_digest(train)})


@register_cache_source("bev_distill")
def cache_source(cfg: BEVDistillConfig) -> CacheSource:
    """`xmodal cache CONFIG`: the teacher's BEV maps, heatmaps and box regression per training scene (no
    augmentation, so one pass serves every epoch); set `teacher.cache` to train from them."""
    if cfg.teacher is None:
        raise ConfigError("xmodal cache: this config has no 'teacher' block, so there is no teacher to cache")
    splits = resolve_splits(cfg.data)
    model, _ = obtain_teacher(cfg.teacher, cfg.data, splits, Path(cfg.run_dir), cfg.eval)
    model.eval().requires_grad_(False)
    ds = scene_dataset(splits.train, cfg.data)
    return CacheSource(model, ds, teacher_fingerprint(model, cfg.data, splits.train), collate_fn=ds.collate,
                       batch_size=cfg.train.batch_size, out_dir=cfg.teacher.cache, meta={"data": str(splits.train)})


# ---------------------------------------------------------------- the job


@register_job("bev_distill", BEVDistillConfig,
              help="train a BEV detector (e.g. camera) from a BEV teacher (e.g. LiDAR) with UniDistill; mAP/NDS")
def run(cfg: BEVDistillConfig) -> dict[str, Any]:
    from xmodal.engine import Distiller
    from xmodal.losses import build_losses

    seed_everything(cfg.train.seed)
    resolve_device(cfg.train.device)
    run_dir = Path(cfg.run_dir)
    splits = resolve_splits(cfg.data)
    train_ds = scene_dataset(splits.train, cfg.data)
    check_boxes_present(train_ds, "data.train")
    specs = cfg.loss_specs()
    losses = build_losses(specs)

    teacher = teacher_file = fingerprint = None
    if cfg.teacher is not None:
        teacher, teacher_file = obtain_teacher(cfg.teacher, cfg.data, splits, run_dir, cfg.eval)
        teacher.eval().requires_grad_(False)
        fingerprint = teacher_fingerprint(teacher, cfg.data, splits.train)
    losses.check_inputs(PRODUCES, None if teacher is None else PRODUCES,
                        hint="the unidistill losses need a teacher: add a 'teacher' block or use preset: "
                        "detection_only")

    seed_everything(cfg.train.seed)  # the student's initialisation must not depend on how the teacher was obtained
    student = create_student(on_data(cfg.student, train_ds), family="bev")
    if teacher is not None and cfg.projection == "linear":
        student.project_to(teacher.widths, always=True)
    cache = cfg.teacher.cache if cfg.teacher is not None else None
    if cache is not None:
        log.info("teacher: reading its outputs from the cache %s", cache)
    e = cfg.eval
    val = eval_loader(splits.val, cfg.data, e.batch_size)
    evaluator = None
    if val is not None:
        def evaluator(m: BEVDetector) -> dict[str, float]:
            return _summary(evaluate_detection(m, val, train_ds.classes, decode=e.decode, max_batches=e.max_batches))
    log.info("student: %s-parameter %s detector; losses: %s", f"{sum(p.numel() for p in student.parameters()):,}",
             cfg.student.sensor, ", ".join(f"{s.label or s.name}×{s.weight:g}" for s in specs))
    start = time.perf_counter()
    out = Distiller(student, losses, train_ds, cfg.train, run_dir, teacher=cache if cache is not None else teacher,
                    evaluator=evaluator, config=cfg, teacher_fingerprint=fingerprint, resume=cfg.resume,
                    collate_fn=train_ds.collate).fit()
    train_seconds = time.perf_counter() - start
    save_detector(student, run_dir / MODEL_FILE, meta={"classes": list(train_ds.classes), "data": str(splits.train)})

    results: dict[str, Any] = {
        "train_seconds": round(train_seconds, 1),
        "teacher_path": None if teacher_file is None else str(teacher_file),
        "student_params": sum(p.numel() for n, p in student.named_parameters() if not n.startswith("projections.")),
        "losses": [{"name": s.name, "weight": s.weight} for s in specs],
        "train": {k: v for k, v in out.items() if isinstance(v, (int, float, str))},
    }
    test = eval_loader(splits.test, cfg.data, e.batch_size)
    if test is not None:
        results["student"] = evaluate_detection(student, test, train_ds.classes, decode=e.decode)
        if teacher is not None:
            results["teacher"] = evaluate_detection(teacher, test, train_ds.classes, decode=e.decode)
    atomic_write_json(run_dir / "results.json", results)
    for who in ("teacher", "student"):
        if who in results:
            r = results[who]
            log.info("%s test: mAP %.4f, NDS %.4f (%d scenes)", who, r["mAP"], r["NDS"], r["scenes"])
    return results


"""synthetic-scenes: a seeded image-caption world of coloured shapes whose captions need composition.

Every image holds 1–3 objects (colour × shape × size) placed on a grid; captions state their attributes and
spatial relations. Multi-object scenes come with attribute-swapped twins (red circle + blue square next to blue
circle + red square, A left of B next to B left of A), so colour or shape matching alone cannot retrieve them.
Multi-object scenes are split by their bag of attributes, so test compositions are never seen in training.
A separate, class-balanced set of single-object images is the zero-shot task: one class per object of the vocabulary
("small red circle"), whose prompts are that object's single-object captions word for word.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from xmodal.errors import ConfigError, DataError
from xmodal.io import record_matches

log = logging.getLogger(__name__)

WORLD_NAME = "synthetic-scenes"
WORLD_VERSION = 2  # 2: balanced single-object zero-shot split, prompts in the caption vocabulary
SPLITS = ("train", "val", "test")  # the image-caption splits (one CSV each)
ZEROSHOT_SPLIT = "zeroshot"  # single-object images for zero-shot classification (no CSV)
CSV_SEPARATOR = "\t"  # open_clip's default --csv-separator
IMAGE_KEY, CAPTION_KEY = "filepath", "title"  # open_clip's default --csv-img-key / --csv-caption-key

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 132, 20),
    "yellow": (228, 196, 18),
    "green": (44, 160, 44),
    "blue": (31, 84, 214),
    "purple": (134, 52, 180),
    "pink": (236, 102, 176),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
LONG_FORM = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# grid step (row, col) from an object to the object it is related to: "A left of B" → B is to A's right
_STEP = {"left of": (0, 1), "right of": (0, -1), "above": (1, 0), "below": (-1, 0)}
_RADIUS = {"small": 0.26, "large": 0.40}  # object radius as a fraction of a grid cell
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2, ZEROSHOT_SPLIT: 3}


@dataclass(frozen=True)
class SceneWorldConfig:
    """Vocabulary, layout and rendering knobs of the world; the defaults define `synthetic-scenes`."""

    image_size: int = 64
    colors: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    grid: int = 3  # objects sit in cells of a grid × grid layout
    object_count_probs: tuple[float, ...] = (0.3, 0.45, 0.25)  # P(1 object), P(2), P(3)
    twin_prob: float = 0.5  # chance that a multi-object scene is followed by an attribute-swapped twin
    holdout_compositions: bool = True  # multi-object attribute bags are disjoint across splits
    holdout_fractions: tuple[float, float] = (0.1, 0.1)  # share of attribute bags reserved for (val, test)
    jitter: float = 0.6  # share of the free space in its cell an object may move by
    scale_jitter: float = 0.08
    max_rotation: float = 12.0  # degrees
    color_jitter: int = 14  # per-channel shade variation of object colours
    noise: float = 5.0  # per-pixel background noise (std)
    texture: float = 10.0  # low-frequency background texture amplitude
    supersample: int = 4  # antialiasing factor for drawing shapes

    def __post_init__(self):
        object.__setattr__(self, "colors", tuple(self.colors))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "object_count_probs", tuple(float(p) for p in self.object_count_probs))
        object.__setattr__(self, "holdout_fractions", tuple(float(p) for p in self.holdout_fractions))
        _check_vocab("colors", self.colors, tuple(PALETTE))
        _check_vocab("shapes", self.shapes, SHAPES)
        _check_vocab("sizes", self.sizes, SIZES)
        if self.image_size < 16:
            raise ConfigError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if self.grid < 2:
            raise ConfigError(f"grid must be at least 2 (two objects need two cells), got {self.grid}")
        probs = self.object_count_probs
        if not 1 <= len(probs) <= 3 or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise ConfigError(
                f"object_count_probs must hold 1-3 non-negative weights for 1, 2, 3 objects, got {list(probs)}"
            )
        if len(self.holdout_fractions) != 2 or sum(self.holdout_fractions) >= 1 or min(self.holdout_fractions) < 0:
            raise ConfigError(
                f"holdout_fractions must be two non-negative shares (val, test) summing below 1, "
                f"got {list(self.holdout_fractions)}"
            )
        if not 0 <= self.twin_prob <= 1:
            raise ConfigError(f"twin_prob must be in [0, 1], got {self.twin_prob}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.supersample < 1:
            raise ConfigError(f"supersample must be at least 1, got {self.supersample}")
        if len(self.colors) * len(self.shapes) * len(self.sizes) < 3:
            raise ConfigError("the vocabulary must allow at least 3 distinct objects")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SceneWorldConfig:
        """Build from a plain dict (e.g. the `config` entry of world.json), rejecting unknown keys."""
        from xmodal.registry import suggest

        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown scene world setting '{key}'{suggest(key, names)}")
        return cls(**dict(data))


def _check_vocab(what: str, values: tuple[str, ...], known: tuple[str, ...]) -> None:
    from xmodal.registry import suggest

    if not values:
        raise ConfigError(f"{what} must not be empty; choose from {', '.join(known)}")
    for v in values:
        if v not in known:
            raise ConfigError(f"unknown {what[:-1]} '{v}'{suggest(v, known)}; choose from {', '.join(known)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what} lists a value twice: {list(values)}")


@dataclass(frozen=True)
class SceneObject:
    """One shape: its attributes (what captions say) and its exact placement (what only pixels show)."""

    color: str
    shape: str
    size: str
    row: int
    col: int
    dx: float = 0.0  # offset from the cell centre, as a fraction of the cell
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects plus the relations captions describe: `(i, relation, j)` reads "object i <relation> object j"."""

    objects: tuple[SceneObject, ...]
    relations: tuple[tuple[int, str, int], ...] = ()
    background: tuple[int, int, int] = (228, 228, 228)
    noise_seed: int = 0

    @property
    def key(self) -> str:
        """Canonical description ignoring jitter: equal keys mean equal captions' truth."""
        objs = " | ".join(o.phrase for o in self.objects)
        rels = " | ".join(f"{i} {r} {j}" for i, r, j in self.relations)
        return f"{objs} || {rels}"

    @property
    def attribute_bag(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """Sorted colours, shapes and sizes: unchanged by attribute swaps, so twins share it."""
        return (
            tuple(sorted(o.color for o in self.objects)),
            tuple(sorted(o.shape for o in self.objects)),
            tuple(sorted(o.size for o in self.objects)),
        )

    def to_dict(self) -> dict:
        return {
            "objects": [asdict(o) for o in self.objects],
            "relations": [list(r) for r in self.relations],
            "background": list(self.background),
            "noise_seed": self.noise_seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        objs = tuple(SceneObject(**{**o, "tint": tuple(o.get("tint", (0, 0, 0)))}) for o in d["objects"])
        rels = tuple((int(i), str(r), int(j)) for i, r, j in d.get("relations", ()))
        return cls(objs, rels, tuple(d.get("background", (228, 228, 228))), int(d.get("noise_seed", 0)))


# ----------------------------------------------------------------------------------------------- sampling


def _reach(size: str, cfg: SceneWorldConfig) -> float:
    """How far (in cells) an object of this size may sit from its cell centre without leaving the cell."""
    return max(0.5 - _RADIUS[size] * (1 + cfg.scale_jitter) - 0.02, 0.0) * cfg.jitter


def _draw_object(rng: np.random.Generator, cfg: SceneWorldConfig, row: int, col: int, taken: set) -> SceneObject:
    while True:
        color = cfg.colors[rng.integers(len(cfg.colors))]
        shape = cfg.shapes[rng.integers(len(cfg.shapes))]
        size = cfg.sizes[rng.integers(len(cfg.sizes))]
        if (size, color, shape) not in taken:
            break
    reach = _reach(size, cfg)
    return SceneObject(
        color=color,
        shape=shape,
        size=size,
        row=row,
        col=col,
        dx=round(float(rng.uniform(-reach, reach)), 4),
        dy=round(float(rng.uniform(-reach, reach)), 4),
        scale=round(float(1 + rng.uniform(-cfg.scale_jitter, cfg.scale_jitter)), 4),
        angle=round(float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)), 2),
        tint=tuple(int(t) for t in rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3)),
    )


def _aligned_cells(cell: tuple[int, int], relation: str, grid: int) -> list[tuple[int, int]]:
    """Cells X such that "object in X <relation> object in `cell`" holds along one grid line."""
    dr, dc = _STEP[relation]
    out, (r, c) = [], cell
    r, c = r - dr, c - dc
    while 0 <= r < grid and 0 <= c < grid:
        out.append((r, c))
        r, c = r - dr, c - dc
    return out


def sample_scene(rng: np.random.Generator, cfg: SceneWorldConfig | None = None, n_objects: int | None = None) -> Scene:
    """Draw one scene: object count, distinct objects, grid layout realising the sampled relations."""
    cfg = cfg or SceneWorldConfig()
    if n_objects is None:
        p = np.asarray(cfg.object_count_probs, dtype=float)
        n_objects = int(rng.choice(len(p), p=p / p.sum())) + 1
    if not 1 <= n_objects <= 3:
        raise ConfigError(f"scenes hold 1 to 3 objects, asked for {n_objects}")
    g = cfg.grid
    cells: list[tuple[int, int]] = []
    relations: list[tuple[int, str, int]] = []
    if n_objects == 1:
        cells.append((int(rng.integers(g)), int(rng.integers(g))))
    else:
        anchor = (int(rng.integers(g)), int(rng.integers(g)))
        options = [(rel, c) for rel in RELATIONS for c in _aligned_cells(anchor, rel, g)]
        rel, first = options[rng.integers(len(options))]
        cells += [first, anchor]
        relations.append((0, rel, 1))
        if n_objects == 3:
            options = [
                (partner, rel, c)
                for partner in (0, 1)
                for rel in RELATIONS
                for c in _aligned_cells(cells[partner], rel, g)
                if c not in cells
            ]
            partner, rel, third = options[rng.integers(len(options))]
            cells.append(third)
            relations.append((2, rel, partner))
    taken: set = set()
    objects = []
    for row, col in cells:
        obj = _draw_object(rng, cfg, row, col, taken)
        taken.add(obj.attributes)
        objects.append(obj)
    grey = rng.integers(212, 244)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-8, 9, size=3))
    return Scene(tuple(objects), tuple(relations), background, int(rng.integers(2**31 - 1)))


TWIN_KINDS = ("color", "shape", "size", "relation")


def make_twin(
    scene: Scene, rng: np.random.Generator, cfg: SceneWorldConfig | None = None
) -> tuple[Scene, str] | None:
    """An attribute-swapped hard negative: swap colour, shape or size between the two related objects,
    or swap the objects themselves (A left of B → B left of A). Layout and relations stay, so the twin's
    captions differ only in composition. None when no swap changes the scene (e.g. one object)."""
    cfg = cfg or SceneWorldConfig()
    if len(scene.relations) == 0:
        return None
    i, _, j = scene.relations[0]
    a, b = scene.objects[i], scene.objects[j]
    kinds = list(TWIN_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "relation":
            na = replace(a, color=b.color, shape=b.shape, size=b.size)
            nb = replace(b, color=a.color, shape=a.shape, size=a.size)
        else:
            if getattr(a, kind) == getattr(b, kind):
                continue
            na, nb = replace(a, **{kind: getattr(b, kind)}), replace(b, **{kind: getattr(a, kind)})
        objs = list(scene.objects)
        objs[i], objs[j] = _keep_in_cell(na, cfg), _keep_in_cell(nb, cfg)
        if len({o.attributes for o in objs}) < len(objs):
            continue
        twin = replace(scene, objects=tuple(objs), noise_seed=int(rng.integers(2**31 - 1)))
        if twin.key != scene.key:
            return twin, kind
    return None


def _keep_in_cell(obj: SceneObject, cfg: SceneWorldConfig) -> SceneObject:
    """Pull an object that grew (small → large) back inside its cell."""
    r = _reach(obj.size, cfg)
    return replace(obj, dx=float(np.clip(obj.dx, -r, r)), dy=float(np.clip(obj.dy, -r, r)))


def composition_split(scene: Scene, seed: int, cfg: SceneWorldConfig) -> str | None:
    """The split a multi-object scene's attribute bag belongs to; None for single objects (any split)."""
    if len(scene.objects) < 2 or not cfg.holdout_compositions:
        return None
    digest = hashlib.md5(f"{seed}|{scene.attribute_bag}".encode()).hexdigest()
    u = int(digest[:8], 16) / 2**32
    val, test = cfg.holdout_fractions
    return "test" if u < test else "val" if u < test + val else "train"


# ----------------------------------------------------------------------------------------------- captions


def _np(obj: SceneObject, article: str = "a") -> str:
    return f"{article} {obj.phrase}"


def _clause(scene: Scene, rel: tuple[int, str, int], invert: bool, long: bool, mentioned: set) -> str:
    i, r, j = rel
    if invert:
        i, r, j = j, INVERSE[r], i
    words = f"is {LONG_FORM[r]}" if long else r
    subj = _np(scene.objects[i], "the" if i in mentioned else "a")
    mentioned.add(i)
    obj = _np(scene.objects[j], "the" if j in mentioned else "a")
    mentioned.add(j)
    return f"{subj} {words} {obj}"


_SINGLE_FRAMES = ("{}", "a picture of {}", "there is {} in the image", "{} on a plain background", "an image of {}")
# (frame, relation forms it reads well with): "a picture of A left of B", "an image where A is left of B"
_MULTI_FRAMES = (
    ("{}", (False, True)),
    ("a picture of {}", (False,)),
    ("an image of {}", (False,)),
    ("in this image, {}", (True,)),
    ("an image where {}", (True,)),
)


def _all_captions(scene: Scene) -> list[str]:
    if not scene.relations:
        return [f.format(_np(scene.objects[0])) for f in _SINGLE_FRAMES]
    rels = list(scene.relations)
    out = []
    orders = [rels] if len(rels) == 1 else [rels, rels[::-1]]
    for frame, forms in _MULTI_FRAMES:
        for order in orders:
            for flips in range(2 ** len(order)):
                for long in forms:
                    mentioned: set = set()
                    parts = [
                        _clause(scene, rel, bool(flips >> k & 1), long, mentioned) for k, rel in enumerate(order)
                    ]
                    out.append(frame.format(", and ".join(parts)))
    return out


def captions_for(scene: Scene, rng: np.random.Generator, n: int | None = 3) -> list[str]:
    """`n` distinct paraphrases (all when None), each stating every object's attributes and every relation."""
    options = _all_captions(scene)
    order = rng.permutation(len(options))
    chosen = [options[k] for k in order]
    return chosen if n is None else chosen[:n]


# ----------------------------------------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(radii: Sequence[float], start: float) -> list[tuple[float, float]]:
        k = len(radii)
        pts = []
        for n, rad in enumerate(radii):
            t = math.radians(start + angle + 360.0 * n / k)
            pts.append((cx + rad * r * math.cos(t), cy + rad * r * math.sin(t)))
        return pts

    if shape == "square":
        return ring([1.0] * 4, 45.0)
    if shape == "diamond":
        return ring([1.0] * 4, 0.0)
    if shape == "triangle":
        return [(x, y + 0.15 * r) for x, y in ring([1.1] * 3, -90.0)]
    if shape == "star":
        return ring([1.1, 0.45] * 5, -90.0)
    if shape == "cross":
        w = 0.34
        base = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w),
                (-w, 1)]  # fmt: skip
        t = math.radians(angle)
        c, s = math.cos(t), math.sin(t)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base]
    raise ConfigError(f"unknown shape '{shape}'; known: {', '.join(SHAPES)}")


def object_geometry(obj: SceneObject, cfg: SceneWorldConfig) -> tuple[float, float, float]:
    """Centre (x, y) and radius of an object in output pixels."""
    cell = cfg.image_size / cfg.grid
    cx = (obj.col + 0.5 + obj.dx) * cell
    cy = (obj.row + 0.5 + obj.dy) * cell
    return cx, cy, _RADIUS[obj.size] * obj.scale * cell


def _background(scene: Scene, cfg: SceneWorldConfig) -> np.ndarray:
    s = cfg.image_size
    rng = np.random.default_rng(scene.noise_seed)
    coarse = rng.uniform(-cfg.texture, cfg.texture, size=(5, 5)).astype(np.float32)
    field_img = Image.fromarray(coarse, mode="F").resize((s, s), Image.Resampling.BICUBIC)
    texture = np.asarray(field_img, dtype=np.float32)[..., None]
    noise = rng.normal(0.0, cfg.noise, size=(s, s, 1)).astype(np.float32)
    bg = np.asarray(scene.background, dtype=np.float32)[None, None, :] + texture + noise
    return np.clip(bg, 0, 255).astype(np.uint8)


def render_scene(scene: Scene, cfg: SceneWorldConfig | None = None) -> Image.Image:
    """Draw the scene as an RGB image; a pure function of (scene, cfg)."""
    cfg = cfg or SceneWorldConfig()
    s, ss = cfg.image_size, cfg.supersample
    img = Image.fromarray(_background(scene, cfg), mode="RGB")
    for obj in scene.objects:
        cx, cy, r = object_geometry(obj, cfg)
        mask = Image.new("L", (s * ss, s * ss), 0)
        draw = ImageDraw.Draw(mask)
        if obj.shape == "circle":
            draw.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
        else:
            draw.polygon([(x * ss, y * ss) for x, y in _shape_points(obj.shape, cx, cy, r, obj.angle)], fill=255)
        if ss > 1:
            mask = mask.reduce(ss)
        color = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(PALETTE[obj.color], obj.tint))
        img.paste(color, (0, 0, s, s), mask)
    return img


# ----------------------------------------------------------------------------------------------- world


@dataclass
class SceneSample:
    """One image of a split: its relative file path, scene, captions and, for twins, whom it mirrors."""

    filepath: str
    scene: Scene
    captions: list[str]
    twin_of: int | None = None  # index in the same split of the scene this one swaps attributes with
    twin_kind: str | None = None

    def to_dict(self, split: str) -> dict:
        return {
            "split": split,
            "filepath": self.filepath,
            "captions": self.captions,
            "twin_of": self.twin_of,
            "twin_kind": self.twin_kind,
            "key": self.scene.key,
            "scene": self.scene.to_dict(),
        }


@dataclass
class SceneWorld:
    """A generated world: its settings and the samples of every split (no pixels; render on demand)."""

    cfg: SceneWorldConfig
    seed: int
    captions_per_image: int
    splits: dict[str, list[SceneSample]] = field(default_factory=dict)
    root: str | None = None  # folder the world was written to, when loaded from disk

    def describe(self) -> dict:
        """The world.json content: name, seed, counts, vocabulary and settings."""
        return {
            "name": WORLD_NAME,
            "synthetic": True,
            "version": WORLD_VERSION,
            "description": "Seeded synthetic image-caption world: 1-3 coloured shapes with sizes and spatial "
            "relations; captions need composition (attribute-swapped twins, held-out attribute bags). "
            "The zero-shot split holds single-object images, the same number for every object class.",
            "seed": self.seed,
            "image_size": self.cfg.image_size,
            "captions_per_image": self.captions_per_image,
            "counts": {k: len(v) for k, v in self.splits.items()},
            "rows": {k: sum(len(s.captions) for s in v) for k, v in self.splits.items() if k in SPLITS},
            "vocab": {
                "colors": list(self.cfg.colors),
                "shapes": list(self.cfg.shapes),
                "sizes": list(self.cfg.sizes),
                "relations": list(RELATIONS),
            },
            "files": {k: f"{k}.csv" for k in self.splits if k in SPLITS}
            | {"scenes": "scenes.jsonl", "zeroshot": "zeroshot.json"},
            "csv": {"separator": CSV_SEPARATOR, "image_key": IMAGE_KEY, "caption_key": CAPTION_KEY},
            "config": _jsonable(asdict(self.cfg)),
        }


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _sample_split(
    split: str, n: int, seed: int, cfg: SceneWorldConfig, captions_per_image: int
) -> list[SceneSample]:
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    out: list[SceneSample] = []
    p = np.asarray(cfg.object_count_probs, dtype=float)
    while len(out) < n:
        n_objects = int(rng.choice(len(p), p=p / p.sum())) + 1
        for _ in range(100_000):  # rejection keeps the object-count mix equal across splits
            scene = sample_scene(rng, cfg, n_objects)
            owner = composition_split(scene, seed, cfg)
            if owner is None or owner == split:
                break
        else:
            raise ConfigError(f"could not draw a {n_objects}-object scene for the {split} split; "
                              "the vocabulary is too small for holdout_fractions")
        idx = len(out)
        out.append(SceneSample(f"images/{split}/{idx:06d}.png", scene, captions_for(scene, rng, captions_per_image)))
        if len(scene.objects) > 1 and len(out) < n and rng.random() < cfg.twin_prob:
            made = make_twin(scene, rng, cfg)
            if made is not None:
                twin, kind = made
                out.append(
                    SceneSample(
                        f"images/{split}/{len(out):06d}.png",
                        twin,
                        captions_for(twin, rng, captions_per_image),
                        twin_of=idx,
                        twin_kind=kind,
                    )
                )
                out[idx].twin_of, out[idx].twin_kind = len(out) - 1, kind
    return out


def _sample_zeroshot(per_class: int, seed: int, cfg: SceneWorldConfig, captions_per_image: int) -> list[SceneSample]:
    """`per_class` single-object scenes of every object class (size × colour × shape; place, pose and shade drawn at
    random): one object per image, so its label is unambiguous, and equal class counts, so no class dominates."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[ZEROSHOT_SPLIT]])
    out: list[SceneSample] = []
    for size, color, shape in zeroshot_classes(cfg):
        for _ in range(per_class):
            drawn = sample_scene(rng, cfg, 1)
            obj = _keep_in_cell(replace(drawn.objects[0], size=size, color=color, shape=shape), cfg)
            scene = replace(drawn, objects=(obj,))
            path = f"images/{ZEROSHOT_SPLIT}/{len(out):06d}.png"
            out.append(SceneSample(path, scene, captions_for(scene, rng, captions_per_image)))
    return out


def build_world(
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    cfg: SceneWorldConfig | None = None,
    captions_per_image: int = 3,
    zeroshot_per_class: int = 10,
) -> SceneWorld:
    """Sample every split's scenes and captions (no rendering). Each split draws from its own seeded
    stream, so a split's content does not depend on the other splits' sizes. The zero-shot split holds
    `zeroshot_per_class` single-object images of every colour-shape class (0: none; the test split's
    single-object images are the zero-shot task then)."""
    cfg = cfg or SceneWorldConfig()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in {**counts, "zeroshot_per_class": zeroshot_per_class}.items():
        if int(n) != n or n < 0:
            what = split if split == "zeroshot_per_class" else f"number of {split} images"
            raise ConfigError(f"{what} must be a non-negative integer, got {n}")
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be at least 1, got {captions_per_image}")
    multi = sum(cfg.object_count_probs[1:]) > 0
    shares = {"val": cfg.holdout_fractions[0], "test": cfg.holdout_fractions[1]}
    shares["train"] = 1 - sum(shares.values())
    for split, n in counts.items():
        if cfg.holdout_compositions and multi and n > 0 and shares[split] <= 0:
            raise ConfigError(
                f"holdout_fractions give the {split} split no attribute bags, so it cannot hold multi-object "
                "scenes; raise its share or set holdout_compositions=False"
            )
    world = SceneWorld(cfg, int(seed), int(captions_per_image))
    for split, n in counts.items():
        world.splits[split] = _sample_split(split, int(n), int(seed), cfg, int(captions_per_image))
    if zeroshot_per_class:
        world.splits[ZEROSHOT_SPLIT] = _sample_zeroshot(int(zeroshot_per_class), int(seed), cfg,
                                                        int(captions_per_image))
    return world


# ----------------------------------------------------------------------------------------------- zero-shot


class ZeroShotTask(NamedTuple):
    """Object classification of single-object images: `labels` maps image path → class index."""

    classnames: list[str]
    templates: list[str]
    labels: dict[str, int]


def zeroshot_classes(cfg: SceneWorldConfig) -> list[tuple[str, str, str]]:
    """(size, colour, shape) of every object the vocabulary allows, in class order."""
    return [(size, color, shape) for color in cfg.colors for shape in cfg.shapes for size in cfg.sizes]


def zeroshot_templates() -> list[str]:
    """The single-object caption frames as prompts: filled with a class name ("small red circle") each is word for
    word a caption that images of that object have, so the text tower meets only phrasing it was trained on."""
    return [frame.format("a {}") for frame in _SINGLE_FRAMES]


def zeroshot_task(world: SceneWorld, split: str | None = None) -> ZeroShotTask:
    """Classes are the objects of the vocabulary, named as captions name them ("small red circle"); images are the
    single-object scenes of `split` (default: the zero-shot split, or the test split for a world without one).

    Size is part of the class: a class that merged sizes would average "a small red star" and "a large red star"
    into one prompt vector that matches neither object as well as its own caption does."""
    if split is None:
        split = ZEROSHOT_SPLIT if world.splits.get(ZEROSHOT_SPLIT) else "test"
    classnames = [" ".join(c) for c in zeroshot_classes(world.cfg)]
    index = {name: k for k, name in enumerate(classnames)}
    labels = {}
    for sample in world.splits.get(split, []):
        if len(sample.scene.objects) == 1:
            labels[sample.filepath] = index[sample.scene.objects[0].phrase]
    return ZeroShotTask(classnames, zeroshot_templates(), labels)


def read_zeroshot_task(path: str | os.PathLike) -> ZeroShotTask:
    """Load zeroshot.json; image paths come back absolute (they are stored relative to the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        root = path.parent
        labels = {str((root / item["filepath"]).resolve()): int(item["label"]) for item in data["images"]}
        return ZeroShotTask(list(data["classnames"]), list(data["templates"]), labels)
    except FileNotFoundError as e:
        raise DataError(f"{path}: zero-shot task file not found; generate it with `xmodal data synth-scenes`") from e
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a valid zero-shot task file ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------- writing


def _params(world: SceneWorld) -> dict:
    d = world.describe()
    return {k: d[k] for k in ("name", "version", "seed", "image_size", "captions_per_image", "counts", "config")}


def _is_complete(out: Path, expected: dict) -> bool | None:
    """True when `out` holds exactly this world, False when it holds another, None when it holds none."""
    matches = record_matches(out / "world.json", expected)
    if not matches:
        return matches
    needed = [f"{s}.csv" for s in SPLITS] + ["scenes.jsonl", "zeroshot.json"]
    needed += [f"images/{s}" for s in expected["counts"]]
    return all((out / p).exists() for p in needed)


def _write_csv(path: Path, samples: Sequence[SceneSample]) -> None:
    from xmodal.io import atomic_write

    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=CSV_SEPARATOR, lineterminator="\n")
    writer.writerow([IMAGE_KEY, CAPTION_KEY])
    for s in samples:
        for caption in s.captions:
            writer.writerow([s.filepath, caption])
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def generate_scene_dataset(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int | None = None,
    captions_per_image: int = 3,
    cfg: SceneWorldConfig | None = None,
    *,
    zeroshot_per_class: int = 10,
    overwrite: bool = False,
    progress: bool = True,
) -> SceneWorld:
    """Render the world to PNGs and write open_clip CSVs, scenes.jsonl, zeroshot.json and world.json.

    `image_size` (when given) overrides `cfg.image_size` (64 by default); `zeroshot_per_class` sizes the
    zero-shot split (see `build_world`). Images of a split are written to a
    staging folder that is renamed into place when complete, and world.json, written last, marks the whole
    data set complete; rerunning on a complete folder does nothing.
    """
    from xmodal.io import atomic_write, atomic_write_json
    from xmodal.progress import progress as progress_bar

    cfg = cfg or SceneWorldConfig()
    if image_size is not None:
        cfg = replace(cfg, image_size=int(image_size))
    world = build_world(n_train, n_val, n_test, seed, cfg, captions_per_image, zeroshot_per_class)
    out = Path(out_dir)
    world.root = str(out)
    state = _is_complete(out, _params(world))
    if state and not overwrite:
        log.info("%s already holds this synthetic-scenes world; nothing to do", out)
        return world
    if state is False and not overwrite:
        raise DataError(
            f"{out} holds a different synthetic-scenes world (see {out / 'world.json'}); choose another output "
            "folder or pass overwrite=True (--overwrite) to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)  # from here on the folder is incomplete until rewritten
    total = sum(len(v) for v in world.splits.values())
    bar = progress_bar(total=total, desc="synthetic-scenes", unit="img", enabled=progress)
    for split, samples in world.splits.items():
        final = out / "images" / split
        staging = out / "images" / f".{split}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for k, sample in enumerate(samples):
            render_scene(sample.scene, cfg).save(staging / f"{k:06d}.png", format="PNG", compress_level=1)
            bar.update(1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if split in SPLITS:
            _write_csv(out / f"{split}.csv", samples)
    bar.close()
    with atomic_write(out / "scenes.jsonl", "w") as f:
        for split, samples in world.splits.items():
            for sample in samples:
                f.write(json.dumps(sample.to_dict(split)) + "\n")
    task = zeroshot_task(world)
    atomic_write_json(
        out / "zeroshot.json",
        {
            "name": f"{WORLD_NAME} objects",
            "synthetic": True,
            "split": ZEROSHOT_SPLIT if world.splits.get(ZEROSHOT_SPLIT) else "test",
            "classnames": task.classnames,
            "templates": task.templates,
            "images": [{"filepath": p, "label": y} for p, y in task.labels.items()],
        },
    )
    atomic_write_json(out / "world.json", world.describe())
    return world


def load_world(out_dir: str | os.PathLike) -> SceneWorld:
    """Read a world written by `generate_scene_dataset` back (settings, scenes, captions, twins)."""
    out = Path(out_dir)
    meta_path, scenes_path = out / "world.json", out / "scenes.jsonl"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found; {out} is not a complete synthetic-scenes folder "
                        "(generate it with `xmodal data synth-scenes --out DIR`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        cfg = SceneWorldConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: not a valid world description ({type(e).__name__}: {e})") from e
    world = SceneWorld(cfg, int(meta["seed"]), int(meta["captions_per_image"]), {s: [] for s in SPLITS}, str(out))
    with open(scenes_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                d = json.loads(line)
                sample = SceneSample(d["filepath"], Scene.from_dict(d["scene"]), list(d["captions"]),
                                     d.get("twin_of"), d.get("twin_kind"))
                world.splits.setdefault(d["split"], []).append(sample)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{scenes_path}:{line_no}: malformed scene record ({type(e).__name__}: {e})") from e
    return world

"""synthetic-scenes: determinism, captions that parse back to the scene, twins, disjoint splits, zero-shot."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest

from xmodal.data import scenes as S
from xmodal.data.image_text import read_records
from xmodal.errors import ConfigError, DataError

CFG = S.SceneWorldConfig()
NP = rf"(a|the) ({'|'.join(S.SIZES)}) ({'|'.join(S.PALETTE)}) ({'|'.join(S.SHAPES)})"
REL = r"(is to the left of|is to the right of|is above|is below|left of|right of|above|below)"
PREFIXES = ("a picture of ", "an image of ", "in this image, ", "an image where ", "there is ")
SUFFIXES = (" in the image", " on a plain background")


def parse_caption(text: str) -> list[tuple]:
    """Caption → [(article, attrs, relation, article, attrs) | (article, attrs)] per clause; fails on anything else."""
    for p in PREFIXES:
        if text.startswith(p):
            text = text[len(p):]
            break
    for s in SUFFIXES:
        if text.endswith(s):
            text = text[: -len(s)]
            break
    out = []
    for clause in text.split(", and "):
        m = re.fullmatch(rf"{NP}(?: {REL} {NP})?", clause)
        assert m, f"unparseable clause {clause!r}"
        g = m.groups()
        if g[4] is None:
            out.append((g[0], g[1:4]))
        else:
            rel = g[4].removeprefix("is ").removeprefix("to the ")
            out.append((g[0], g[1:4], rel, g[5], g[6:9]))
    return out


def _centre(obj):
    x, y, _ = S.object_geometry(obj, CFG)
    return x, y


def relation_holds(a, rel, b) -> bool:
    """Dominant-axis test on pixel centres: "a left of b" means clearly left, not mainly above or below."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = bx - ax, by - ay
    if rel in ("left of", "right of"):
        return (dx > 0 if rel == "left of" else dx < 0) and abs(dx) > 1.5 * abs(dy)
    return (dy > 0 if rel == "above" else dy < 0) and abs(dy) > 1.5 * abs(dx)


@pytest.fixture(scope="module")
def world():
    return S.build_world(400, 150, 300, seed=7, captions_per_image=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    S.generate_scene_dataset(out, 40, 16, 60, seed=3, captions_per_image=2, zeroshot_per_class=2, progress=False)
    return out


def test_same_seed_same_pixels_and_captions(tmp_path):
    a = S.build_world(30, 10, 10, seed=11)
    b = S.build_world(30, 10, 10, seed=11)
    c = S.build_world(30, 10, 10, seed=12)
    for split in S.SPLITS:
        assert [s.scene for s in a.splits[split]] == [s.scene for s in b.splits[split]]
        assert [s.captions for s in a.splits[split]] == [s.captions for s in b.splits[split]]
    assert [s.scene.key for s in a.splits["train"]] != [s.scene.key for s in c.splits["train"]]
    for s_a, s_b in zip(a.splits["train"], b.splits["train"]):
        assert np.array_equal(np.asarray(S.render_scene(s_a.scene, CFG)), np.asarray(S.render_scene(s_b.scene, CFG)))
    S.generate_scene_dataset(tmp_path / "x", 12, 4, 6, seed=5, progress=False)
    S.generate_scene_dataset(tmp_path / "y", 12, 4, 6, seed=5, progress=False)
    for rel in ["train.csv", "test.csv", "zeroshot.json", "scenes.jsonl", "images/train/000007.png"]:
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes(), rel


def test_split_content_does_not_depend_on_other_split_sizes():
    a = S.build_world(20, 5, 30, seed=2)
    b = S.build_world(50, 9, 30, seed=2)
    assert [s.scene for s in a.splits["test"]] == [s.scene for s in b.splits["test"]]


def test_images_are_rgb_of_requested_size():
    cfg = S.SceneWorldConfig(image_size=48)
    scene = S.sample_scene(np.random.default_rng(0), cfg, n_objects=3)
    img = S.render_scene(scene, cfg)
    assert img.mode == "RGB" and img.size == (48, 48)


def test_every_caption_parses_back_to_the_scene(world):
    rng = np.random.default_rng(0)
    checked = Counter()
    for sample in world.splits["train"][:150]:
        scene = sample.scene
        by_attrs = {o.attributes: k for k, o in enumerate(scene.objects)}
        assert len(by_attrs) == len(scene.objects), "objects in a scene must be distinguishable"
        true_rels = set(scene.relations) | {(j, S.INVERSE[r], i) for i, r, j in scene.relations}
        for caption in S.captions_for(scene, rng, n=None) + sample.captions:
            clauses = parse_caption(caption)
            mentioned, seen, said = set(), set(), set()
            for clause in clauses:
                if len(clause) == 2:
                    art, attrs = clause
                    assert art == "a" and by_attrs.get(attrs) == 0 and len(scene.objects) == 1
                    mentioned.add(attrs)
                    continue
                art_a, attrs_a, rel, art_b, attrs_b = clause
                i, j = by_attrs[attrs_a], by_attrs[attrs_b]  # KeyError: caption names an absent object
                assert (i, rel, j) in true_rels, f"{caption!r} states a relation the scene does not have"
                assert relation_holds(scene.objects[i], rel, scene.objects[j]), caption
                for art, k in ((art_a, i), (art_b, j)):
                    assert art == ("the" if k in seen else "a"), f"article of object {k} in {caption!r}"
                    seen.add(k)
                mentioned |= {attrs_a, attrs_b}
                said.add(frozenset((i, j)))
            assert mentioned == set(by_attrs), f"{caption!r} leaves out an object"
            assert said == {frozenset((i, j)) for i, _, j in scene.relations}, f"{caption!r} misses a relation"
            checked[len(scene.objects)] += 1
    assert all(checked[n] > 20 for n in (1, 2, 3)), checked


def test_captions_are_distinct_paraphrases(world):
    rng = np.random.default_rng(1)
    scene = next(s.scene for s in world.splits["train"] if len(s.scene.objects) == 2)
    caps = S.captions_for(scene, rng, n=5)
    assert len(set(caps)) == 5
    assert all(len(s.captions) == 3 and len(set(s.captions)) == 3 for s in world.splits["train"])


def test_pixels_agree_with_relations_and_colours(world):
    """Centroids of each object's colour in the rendered image respect the stated relation."""
    palette = np.array([S.PALETTE[c] for c in CFG.colors], dtype=float)
    checked = 0
    for sample in world.splits["test"]:
        sc = sample.scene
        if len(sc.objects) != 2 or sc.objects[0].color == sc.objects[1].color:
            continue
        px = np.asarray(S.render_scene(sc, CFG), dtype=float)
        dist = np.linalg.norm(px[:, :, None, :] - palette[None, None], axis=-1)
        nearest, close = dist.argmin(-1), dist.min(-1) < 45
        centres = []
        for obj in sc.objects:
            ys, xs = np.nonzero(close & (nearest == CFG.colors.index(obj.color)))
            assert len(xs) > 10, f"{obj.phrase} not visible"
            centres.append((xs.mean(), ys.mean()))
        (i, rel, j), = sc.relations
        (ax, ay), (bx, by) = centres[i], centres[j]
        expect = {"left of": bx > ax, "right of": bx < ax, "above": by > ay, "below": by < ay}
        assert expect[rel], f"{sample.filepath}: {sc.key}"
        checked += 1
    assert checked > 20


def test_large_objects_cover_more_pixels_than_small_ones():
    rng = np.random.default_rng(3)
    area: dict = {}
    for _ in range(150):
        sc = S.sample_scene(rng, CFG, n_objects=1)
        px = np.asarray(S.render_scene(sc, CFG), dtype=float)
        far = np.linalg.norm(px - np.asarray(sc.background, dtype=float), axis=-1) > 60
        area.setdefault((sc.objects[0].shape, sc.objects[0].size), []).append(far.sum())
    for shape in S.SHAPES:
        assert min(area[shape, "large"]) > 1.5 * max(area[shape, "small"]), shape


def test_attribute_swapped_twins_exist_and_defeat_bag_of_words(world):
    test = world.splits["test"]
    kinds = Counter()
    for k, s in enumerate(test):
        if s.twin_of is None:
            continue
        t = test[s.twin_of]
        assert t.twin_of == k and t.twin_kind == s.twin_kind
        assert s.scene.key != t.scene.key
        # same bag of attributes and words: only composition tells the two apart
        assert s.scene.attribute_bag == t.scene.attribute_bag
        assert Counter(s.scene.objects[0].attributes + s.scene.objects[1].attributes) == Counter(
            t.scene.objects[0].attributes + t.scene.objects[1].attributes
        )
        assert [(o.row, o.col) for o in s.scene.objects] == [(o.row, o.col) for o in t.scene.objects]
        kinds[s.twin_kind] += 1
    assert set(kinds) == set(S.TWIN_KINDS), kinds
    multi = sum(len(s.scene.objects) > 1 for s in test)
    assert sum(kinds.values()) > 0.3 * multi


def test_objects_stay_inside_their_cells_twins_included(world):
    cell = CFG.image_size / CFG.grid
    for samples in world.splits.values():
        for s in samples:
            for o in s.scene.objects:
                x, y, r = S.object_geometry(o, CFG)
                assert o.col * cell <= x - r and x + r <= (o.col + 1) * cell, (s.filepath, o)
                assert o.row * cell <= y - r and y + r <= (o.row + 1) * cell, (s.filepath, o)


def test_colour_swap_pairs_recombine_the_same_attributes(world):
    """red circle + blue square and blue circle + red square both occur (as twins or by chance)."""
    found = 0
    by_bag: dict = {}
    for s in world.splits["train"]:
        if len(s.scene.objects) == 2:
            by_bag.setdefault(s.scene.attribute_bag, set()).add(s.scene.key)
    found = sum(len(keys) > 1 for keys in by_bag.values())
    assert found > 20


def test_splits_are_disjoint(world):
    keys = {}
    for split, samples in world.splits.items():
        keys[split] = {s.scene.attribute_bag for s in samples if len(s.scene.objects) > 1}
        assert len({s.filepath for s in samples}) == len(samples)
        assert all(s.filepath.startswith(f"images/{split}/") for s in samples)
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    # the object-count mix is the same in every split despite the held-out compositions
    mix = {sp: np.mean([len(s.scene.objects) for s in world.splits[sp]]) for sp in S.SPLITS}
    assert max(mix.values()) - min(mix.values()) < 0.35, mix


def test_written_images_are_unique_across_splits(written):
    digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(written.glob("images/*/*.png"))]
    assert len(digests) == 40 + 16 + 60 + 2 * 96 and len(set(digests)) == len(digests)


def test_written_csvs_are_open_clip_format(written):
    for split, n in (("train", 40), ("val", 16), ("test", 60)):
        with open(written / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        assert rows[0] == ["filepath", "title"]
        assert len(rows) == 1 + 2 * n
        assert all((written / path).is_file() for path, _ in rows[1:])
        records = read_records(written / f"{split}.csv")
        assert len(records) == n and all(len(r.captions) == 2 for r in records)
        assert records[0].image == str(written / "images" / split / "000000.png")
    meta = json.loads((written / "world.json").read_text())
    assert meta["synthetic"] is True and meta["name"] == "synthetic-scenes" and meta["seed"] == 3
    assert meta["counts"] == {"train": 40, "val": 16, "test": 60, "zeroshot": 2 * 96}
    assert not (written / "zeroshot.csv").exists()  # zero-shot images are for classification, not retrieval
    assert meta["vocab"]["shapes"] == list(S.SHAPES) and len(meta["vocab"]["colors"]) == 8


def test_zeroshot_labels_match_the_pixels(written):
    task = S.read_zeroshot_task(written / "zeroshot.json")
    assert len(task.classnames) == 96 and len(set(task.classnames)) == 96  # 2 sizes × 8 colours × 6 shapes
    assert all("{}" in t for t in task.templates)
    world = S.load_world(written)
    images = {str(written / s.filepath) for s in world.splits["zeroshot"]}
    assert set(task.labels) == images and len(images) == 2 * 96
    from PIL import Image

    palette = np.array([S.PALETTE[c] for c in CFG.colors], dtype=float)
    for path, label in task.labels.items():
        size, colour, shape = task.classnames[label].split()
        px = np.asarray(Image.open(path).convert("RGB"), dtype=float).reshape(-1, 3)
        dist = np.linalg.norm(px[:, None] - palette[None], axis=-1)
        votes = Counter(dist[dist.min(1) < 45].argmin(1).tolist())
        assert CFG.colors[votes.most_common(1)[0][0]] == colour, path
        sample = next(s for s in world.splits["zeroshot"] if str(written / s.filepath) == path)
        assert (sample.scene.objects[0].shape, sample.scene.objects[0].size) == (shape, size)


def test_load_world_round_trips(written):
    world = S.load_world(written)
    again = S.build_world(40, 16, 60, seed=3, captions_per_image=2, zeroshot_per_class=2)
    for split in S.SPLITS:
        assert [s.scene for s in world.splits[split]] == [s.scene for s in again.splits[split]]
        assert [s.twin_of for s in world.splits[split]] == [s.twin_of for s in again.splits[split]]
    assert S.zeroshot_task(world) == S.zeroshot_task(again)


def test_rerun_is_a_no_op_and_other_settings_are_refused(written):
    before = {p: p.stat().st_mtime_ns for p in written.rglob("*") if p.is_file()}
    S.generate_scene_dataset(written, 40, 16, 60, seed=3, captions_per_image=2, zeroshot_per_class=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in written.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match="different synthetic-scenes world"):
        S.generate_scene_dataset(written, 40, 16, 60, seed=3, captions_per_image=2, zeroshot_per_class=3,
                                 progress=False)


def test_crash_leaves_no_complete_marker_and_rerun_recovers(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = S.render_scene

    def flaky(scene, cfg=None):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real(scene, cfg)

    monkeypatch.setattr(S, "render_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.generate_scene_dataset(tmp_path, 10, 10, 10, seed=1, progress=False)
    assert not (tmp_path / "world.json").exists()
    assert not (tmp_path / "images" / "val").exists() and not (tmp_path / "val.csv").exists()
    monkeypatch.setattr(S, "render_scene", real)
    S.generate_scene_dataset(tmp_path, 10, 10, 10, seed=1, progress=False)
    assert (tmp_path / "world.json").is_file()
    assert len(list((tmp_path / "images" / "val").glob("*.png"))) == 10
    assert not list((tmp_path / "images").glob(".*"))


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="did you mean 'purple'"):
        S.SceneWorldConfig(colors=("red", "purpel"))
    with pytest.raises(ConfigError, match="image_size"):
        S.SceneWorldConfig(image_size=8)
    with pytest.raises(ConfigError, match="unknown scene world setting 'gird'.*'grid'"):
        S.SceneWorldConfig.from_dict({"gird": 4})
    with pytest.raises(ConfigError, match="val split"):
        S.build_world(5, 5, 5, cfg=S.SceneWorldConfig(holdout_fractions=(0.0, 0.2)))


def test_small_vocabulary_world_still_has_composition():
    cfg = S.SceneWorldConfig(colors=("red", "blue"), shapes=("circle", "square"), holdout_compositions=False)
    world = S.build_world(60, 0, 0, seed=0, cfg=cfg)
    assert {s.scene.objects[0].color for s in world.splits["train"]} == {"red", "blue"}
    assert any(s.twin_kind for s in world.splits["train"])


def test_cli_writes_and_reports(tmp_path, capsys):
    from xmodal.cli import main

    code = main(["data", "synth-scenes", "--out", str(tmp_path / "w"), "--train", "6", "--val", "2",
                 "--test", "4", "--seed", "9", "--image-size", "32", "--zeroshot-per-class", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "train.csv: 6 images" in printed
    assert "zeroshot.json: 96 classes (size colour shape), 192 single-object images from the zero-shot split" in printed
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta["image_size"] == 32 and meta["seed"] == 9
    from PIL import Image

    assert Image.open(tmp_path / "w" / "images" / "test" / "000000.png").size == (32, 32)


def test_zeroshot_images_hold_one_object_of_their_class_in_equal_numbers():
    """Each zero-shot image's label is unambiguous (one object, whose size, colour and shape name the class), and
    every class has the same number of images, so top-1 is not dominated by a few frequent classes."""
    world = S.build_world(10, 0, 0, seed=4, zeroshot_per_class=3)
    task = S.zeroshot_task(world)
    by_path = {s.filepath: s for s in world.splits["zeroshot"]}
    assert set(task.labels) == set(by_path)
    for path, label in task.labels.items():
        objects = by_path[path].scene.objects
        assert len(objects) == 1
        assert task.classnames[label] == f"{objects[0].size} {objects[0].color} {objects[0].shape}"
    assert Counter(task.labels.values()) == {k: 3 for k in range(len(task.classnames))}
    assert len(task.classnames) == len(S.SIZES) * len(S.PALETTE) * len(S.SHAPES)


def test_zeroshot_objects_stay_inside_their_cells():
    world = S.build_world(0, 0, 0, seed=8, zeroshot_per_class=4)
    for sample in world.splits["zeroshot"]:
        obj = sample.scene.objects[0]
        reach = S._reach(obj.size, CFG)
        assert abs(obj.dx) <= reach + 1e-9 and abs(obj.dy) <= reach + 1e-9


def test_zeroshot_prompts_are_captions_of_their_class():
    """Every prompt (a template filled with a class name) is word for word a caption that images of exactly that
    object have, so the text tower meets no phrasing it was not trained on and no other object's words."""
    world = S.build_world(300, 0, 0, seed=5, zeroshot_per_class=1)
    task = S.zeroshot_task(world)
    vocabulary = {w for s in world.splits["train"] for c in s.captions for w in c.split()}
    for name in task.classnames:
        size, colour, shape = name.split()
        scene = S.Scene((S.SceneObject(colour, shape, size, 0, 0),))
        captions = set(S.captions_for(scene, np.random.default_rng(0), None))
        prompts = {t.format(name) for t in task.templates}
        assert prompts == captions
        assert {w for p in prompts for w in p.split()} <= vocabulary


def test_world_without_zeroshot_split_falls_back_to_test_singles():
    world = S.build_world(10, 5, 40, seed=6, zeroshot_per_class=0)
    assert "zeroshot" not in world.splits
    task = S.zeroshot_task(world)
    singles = {s.filepath for s in world.splits["test"] if len(s.scene.objects) == 1}
    assert set(task.labels) == singles and singles
    with pytest.raises(ConfigError, match="zeroshot_per_class"):
        S.build_world(10, 5, 5, zeroshot_per_class=-1)

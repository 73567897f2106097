"""`--data wds:PATH`: retrieval and zero-shot evaluation read straight from webdataset shards (xmodal's own, and
CLIP_benchmark's layout with `cls` labels and class-name files), giving the metrics of the same images on disk."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from conftest import write_tiny_clip_dir
from PIL import Image

from xmodal.cli import main
from xmodal.data.eval_sets import RETRIEVAL, ZEROSHOT, load_eval_set
from xmodal.data.images import image_exists, member_ref, open_rgb, parse_member_ref
from xmodal.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local open_clip folder (config + weights) for a tiny CLIP."""
    return write_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i % 256, 90 + 13 * i % 160, 200 - 11 * i % 200)


def write_csv_set(root, n=9):
    """A CSV image-text set: n PNGs with 2 captions each (tab-separated, one caption per row)."""
    (root / "img").mkdir(parents=True)
    rows = ["filepath\ttitle"]
    for i in range(n):
        Image.new("RGB", (24, 24), colour(i)).save(root / "img" / f"{i}.png")
        rows += [f"img/{i}.png\ta square of colour {i}", f"img/{i}.png\tcolour number {i} fills it"]
    path = root / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour(i)).save(buf, format="PNG")
    return buf.getvalue()


def write_benchmark_wds(root, labels, split="test", per_shard=4, drop_cls=None):
    """CLIP_benchmark's wds layout: ROOT/<split>/<n>.tar with <key>.png + <key>.cls, ROOT/classnames.txt and
    ROOT/zeroshot_classification_templates.txt."""
    folder = root / split
    folder.mkdir(parents=True)
    for s in range(0, len(labels), per_shard):
        with tarfile.open(folder / f"{s // per_shard}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(labels))):
                add(tar, f"s{i:04d}.png", png_bytes(i))
                if i != drop_cls:
                    add(tar, f"s{i:04d}.cls", f"{labels[i]}\n".encode())
    (root / "classnames.txt").write_text("red thing\ngreen thing\nblue thing\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nan image of the {c}.\n")


def test_member_references_open_like_files(tmp_path):
    tar_path = tmp_path / "a.tar"
    with tarfile.open(tar_path, "w") as tar:
        add(tar, "k.txt", b"hello")
        add(tar, "k.png", png_bytes(3))
    with tarfile.open(tar_path) as tar:
        m = tar.getmember("k.png")
        ref = member_ref(tar_path, m.offset_data, m.size)
    assert parse_member_ref(ref) == (str(tar_path), m.offset_data, m.size)
    assert parse_member_ref(str(tar_path)) is None
    assert image_exists(ref) and not image_exists(member_ref(tar_path, m.offset_data, 10**9))
    assert open_rgb(ref).getpixel((5, 5)) == colour(3)


def test_retrieval_from_shards_equals_the_csv_it_was_written_from(tmp_path, model_dir):
    csv = write_csv_set(tmp_path)
    assert main(["data", "shards", str(csv), "--out", str(tmp_path / "shards"), "--max-count", "4"]) == 0
    data = load_eval_set(f"wds:{tmp_path / 'shards'}", RETRIEVAL)
    assert len(data.records) == 9 and all(len(r.captions) == 2 for r in data.records)
    assert data.name == "wds:shards"
    results = {}
    for name, spec in (("csv", str(csv)), ("wds", f"wds:{tmp_path / 'shards'}")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "retrieval", "--model", str(model_dir), "--data", spec, "--device", "cpu",
                     "--batch-size", "4", "--no-progress", "--no-cache", "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())["metrics"]
    assert results["wds"] == pytest.approx(results["csv"])
    assert any(v > 0 for v in results["wds"].values())


def test_retrieval_cache_follows_the_shards(tmp_path, model_dir):
    """The embedding cache keys on the shard files: a rewritten shard set is encoded again."""
    csv = write_csv_set(tmp_path)
    shards = tmp_path / "shards"
    assert main(["data", "shards", str(csv), "--out", str(shards)]) == 0
    before = load_eval_set(f"wds:{shards}", RETRIEVAL).identity().digest
    assert main(["data", "shards", str(csv), "--out", str(shards), "--max-count", "5", "--overwrite"]) == 0
    assert load_eval_set(f"wds:{shards}", RETRIEVAL).identity().digest != before


def test_zero_shot_from_benchmark_style_shards_equals_the_image_folder(tmp_path, model_dir):
    labels = [0, 2, 1, 1, 0, 2, 2, 1, 0, 1]
    write_benchmark_wds(tmp_path / "wds", labels)
    folder = tmp_path / "folder" / "test"
    for i, y in enumerate(labels):
        (folder / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), colour(i)).save(folder / f"c{y}" / f"{i:04d}.png")
    (tmp_path / "folder" / "classnames.txt").write_text("red thing\ngreen thing\nblue thing\n")
    data = load_eval_set(f"wds:{tmp_path / 'wds'}", ZEROSHOT)  # the test split by default
    assert data.classnames == ["red thing", "green thing", "blue thing"]
    assert data.templates == ["a photo of a {}.", "an image of the {}."]
    assert sorted(y for _, y in data.items) == sorted(labels)
    metrics = {}
    for name, spec in (("wds", f"wds:{tmp_path / 'wds'}"), ("folder", f"imagefolder:{tmp_path / 'folder'}")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "zeroshot", "--model", str(model_dir), "--data", spec, "--split", "test",
                     "--templates", str(tmp_path / "wds" / "zeroshot_classification_templates.txt"),
                     "--device", "cpu", "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
        metrics[name] = json.loads(out.read_text())
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert metrics["wds"][key] == pytest.approx(metrics["folder"][key])
    assert metrics["wds"]["n"] == len(labels) and metrics["wds"]["dataset"] == "wds:wds/test"


def test_bad_shard_sets_are_named_errors(tmp_path):
    write_benchmark_wds(tmp_path / "a", [0, 1, 2, 1], drop_cls=2)
    with pytest.raises(DataError, match=r"1 sample\(s\) .*s0002: no integer label"):
        load_eval_set(f"wds:{tmp_path / 'a'}", ZEROSHOT)
    write_benchmark_wds(tmp_path / "b", [0, 1, 5])
    with pytest.raises(DataError, match=r"3 class names, but the shards hold label 5"):
        load_eval_set(f"wds:{tmp_path / 'b'}", ZEROSHOT)
    write_benchmark_wds(tmp_path / "c", [0, 1])
    (tmp_path / "c" / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"no class names; put classnames.txt"):
        load_eval_set(f"wds:{tmp_path / 'c'}", ZEROSHOT)
    with pytest.raises(DataError, match=r"no split folder 'val'"):
        load_eval_set(f"wds:{tmp_path / 'a'}", ZEROSHOT, split="val")
    with pytest.raises(ConfigError, match=r"--split applies to wds:FOLDER"):
        load_eval_set(f"wds:{tmp_path / 'a' / 'test' / '0.tar'}", ZEROSHOT, split="test")
    # a retrieval set needs captions
    with pytest.raises(DataError, match=r"no caption"):
        load_eval_set(f"wds:{tmp_path / 'b'}", RETRIEVAL)

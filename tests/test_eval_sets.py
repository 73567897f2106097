"""Named evaluation sets: Karpathy split JSON (COCO, Flickr30k) and ImageNet-style folders, their errors, the
reader registry, and `xmodal eval retrieval / zeroshot --data NAME:PATH` end to end on a tiny local CLIP."""

from __future__ import annotations

import json
import os

import pytest
from conftest import write_tiny_clip_dir
from PIL import Image

from xmodal.cli import main
from xmodal.data.eval_sets import (
    EVAL_SETS,
    RETRIEVAL,
    ZEROSHOT,
    RetrievalSet,
    eval_set_names,
    open_retrieval_set,
    read_imagefolder,
    register_eval_set,
    split_data_spec,
)
from xmodal.errors import ConfigError, DataError

# 7 images: (split, folder, sentences); restval counts as train
COCO_IMAGES = [
    ("train", "train2014", 5), ("train", "train2014", 6), ("restval", "val2014", 5), ("val", "val2014", 6),
    ("test", "val2014", 5), ("test", "val2014", 6), ("test", "val2014", 5),
]


def png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def write_coco(root, images=COCO_IMAGES):
    """Karpathy's dataset_coco.json layout: root/<filepath>/<filename> and the JSON beside the image folders."""
    entries = []
    for i, (split, folder, n) in enumerate(images):
        name = f"COCO_{folder}_{i:012d}.jpg"
        png(root / folder / name, (30 * i, 200 - 20 * i, 90))
        sentences = [{"raw": f" A picture number {i}, caption {j}. ", "tokens": ["a", "picture"], "imgid": i,
                      "sentid": 10 * i + j} for j in range(n)]
        entries.append({"filepath": folder, "filename": name, "split": split, "sentences": sentences,
                        "imgid": i, "sentids": [s["sentid"] for s in sentences], "cocoid": 1000 + i})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def write_flickr(root, image_dir="flickr30k-images"):
    """dataset_flickr30k.json: no filepath; images in root/flickr30k-images/ (or the root)."""
    entries = []
    for i, split in enumerate(["train", "val", "test", "test"]):
        name = f"{1000 + i}.jpg"
        png(root / image_dir / name, (60 * i, 40, 200 - 40 * i))
        entries.append({"filename": name, "split": split, "imgid": i, "sentids": list(range(5 * i, 5 * i + 5)),
                        "sentences": [{"raw": f"photo {i} text {j}", "tokens": []} for j in range(5)]})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


# ---------------------------------------------------------------------------------------------- Karpathy


def test_coco_karpathy_splits_captions_and_image_paths(tmp_path):
    write_coco(tmp_path)
    test = open_retrieval_set(f"coco-karpathy:{tmp_path}")  # folder holding the JSON; default split test
    assert test.name == "coco-karpathy/test" and len(test.records) == 3
    assert [len(r.captions) for r in test.records] == [5, 6, 5]
    assert test.records[0].captions[0] == "A picture number 4, caption 0."  # raw, stripped
    assert test.records[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000000004.jpg")
    assert test.records[0].ref == "val2014/COCO_val2014_000000000004.jpg"
    assert "dataset_coco.json: images[4]" in test.records[0].where
    assert all(os.path.isfile(r.image) for r in test.records)
    sizes = {s: len(open_retrieval_set(f"coco-karpathy:{tmp_path / 'dataset_coco.json'}", split=s).records)
             for s in ("train", "restval", "val", "test")}
    assert sizes == {"train": 3, "restval": 1, "val": 1, "test": 3}  # train = train + restval
    train = open_retrieval_set(f"coco-karpathy:{tmp_path}", split="train")
    assert sum(len(r.captions) for r in train.records) == 16
    assert [r.image.split("/")[-2] for r in train.records] == ["train2014", "train2014", "val2014"]


def test_flickr30k_karpathy_finds_the_image_folder(tmp_path):
    write_flickr(tmp_path / "a")
    s = open_retrieval_set(f"flickr30k-karpathy:{tmp_path / 'a' / 'dataset_flickr30k.json'}")
    assert s.name == "flickr30k-karpathy/test" and len(s.records) == 2
    assert sum(len(r.captions) for r in s.records) == 10
    assert s.records[0].image == str(tmp_path / "a" / "flickr30k-images" / "1002.jpg")
    write_flickr(tmp_path / "b", image_dir="")  # images beside the JSON
    s = open_retrieval_set(f"flickr30k-karpathy:{tmp_path / 'b'}", split="val")
    assert [r.image for r in s.records] == [str(tmp_path / "b" / "1001.jpg")]
    # --image-root: the JSON elsewhere
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "dataset_flickr30k.json").write_bytes((tmp_path / "a" / "dataset_flickr30k.json").read_bytes())
    s = open_retrieval_set(f"flickr30k-karpathy:{tmp_path / 'c'}", image_root=str(tmp_path / "a"))
    assert s.records[0].image == str(tmp_path / "a" / "flickr30k-images" / "1002.jpg")
    with pytest.raises(DataError, match=r"images\[2\] \(1002.jpg\) is not at .*c/1002.jpg or .*c/flickr30k-images/"
                                        r"1002.jpg.*--image-root"):
        open_retrieval_set(f"flickr30k-karpathy:{tmp_path / 'c'}")


def test_karpathy_errors_name_the_file_key_and_fix(tmp_path):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())

    def bad(mutated, match, spec="coco-karpathy", **kw):
        path.write_text(json.dumps(mutated))
        with pytest.raises(DataError, match=match):
            open_retrieval_set(f"{spec}:{path}", **kw)

    bad({"annotations": [], "images": {}}, r"dataset_coco.json: no 'images' list \(this looks like a COCO annotation")
    broken = json.loads(json.dumps(data))
    del broken["images"][5]["sentences"][2]["raw"]
    bad(broken, r"dataset_coco.json: images\[5\] \(COCO_val2014_000000000005.jpg\) sentences\[2\] has no 'raw'")
    broken = json.loads(json.dumps(data))
    del broken["images"][1]["split"]
    bad(broken, r"images\[1\] has no 'split'")
    bad(data, r"'dataset' is 'coco', not 'flickr30k'; use coco-karpathy:", spec="flickr30k-karpathy")
    only_train = {"images": [im for im in data["images"] if im["split"] == "train"], "dataset": "coco"}
    bad(only_train, r"no images in split 'test'; the file's splits \(images\): train \(2\)")
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"--split 'tset' \(did you mean 'test'\?\) is not a Karpathy split"):
        open_retrieval_set(f"coco-karpathy:{path}", split="tset")
    (tmp_path / "val2014" / "COCO_val2014_000000000004.jpg").unlink()
    with pytest.raises(DataError, match=r"images\[4\] \(COCO_val2014_000000000004.jpg\) is not at "):
        open_retrieval_set(f"coco-karpathy:{path}")
    with pytest.raises(DataError, match=r"no dataset_coco.json in this folder"):
        open_retrieval_set(f"coco-karpathy:{tmp_path / 'val2014'}")


def test_data_spec_parsing_and_unknown_names(tmp_path):
    assert split_data_spec("data.csv", RETRIEVAL) is None
    assert split_data_spec("C:/data/x.csv", RETRIEVAL) is None  # a drive letter is not a set name
    odd = tmp_path / "odd:name.jsonl"
    odd.write_text("")
    assert split_data_spec(str(odd), RETRIEVAL) is None
    reader, path = split_data_spec("coco-karpathy:/data/coco", RETRIEVAL)
    assert reader.name == "coco-karpathy" and path == "/data/coco"
    with pytest.raises(ConfigError, match=r"unknown evaluation set 'coco' \(did you mean 'coco-karpathy'\?\).*reads "
                                          r"coco-karpathy:PATH, flickr30k-karpathy:PATH"):
        split_data_spec("coco:/data/coco", RETRIEVAL)
    with pytest.raises(ConfigError, match=r"imagefolder is a zeroshot set \(use it with xmodal eval zeroshot\)"):
        split_data_spec("imagefolder:/data/in", RETRIEVAL)
    with pytest.raises(ConfigError, match=r"give the path after 'coco-karpathy:'"):
        split_data_spec("coco-karpathy:", RETRIEVAL)
    with pytest.raises(ConfigError, match=r"--split applies to named sets .*not to the file"):
        open_retrieval_set(str(odd), split="test")
    with pytest.raises(ConfigError, match=r"--image-key applies to a CSV/TSV/JSON-lines file, not to coco-karpathy"):
        open_retrieval_set("coco-karpathy:/data", image_key="x")


def test_another_module_registers_a_reader(tmp_path):
    png(tmp_path / "x.png", (1, 2, 3))

    @register_eval_set("toy-pairs", task=RETRIEVAL)
    def read_toy(path: str, *, split: str | None = None) -> RetrievalSet:
        from xmodal.data.image_text import ImageTextRecord

        recs = [ImageTextRecord(str(tmp_path / "x.png"), ["a toy"], ref="x.png")]
        return RetrievalSet(f"toy/{split or 'test'}", recs, path, {}, {"reader": "toy-pairs", "split": split})

    try:
        assert "toy-pairs" in eval_set_names(RETRIEVAL) and "toy-pairs" not in eval_set_names(ZEROSHOT)
        s = open_retrieval_set("toy-pairs:anything", split="dev")
        assert s.name == "toy/dev" and s.records[0].captions == ["a toy"]
        with pytest.raises(ConfigError, match=r"--image-root does not apply to toy-pairs:PATH \(it takes --split\)"):
            open_retrieval_set("toy-pairs:anything", image_root="/x")
        with pytest.raises(ValueError, match="already registered"):
            register_eval_set("toy-pairs", task=RETRIEVAL)(read_toy)
    finally:
        EVAL_SETS._items.pop("toy-pairs", None)


def test_plain_file_cache_identity_is_unchanged(tmp_path):
    from xmodal.tasks.retrieval import data_fingerprint

    png(tmp_path / "a.png", (1, 2, 3))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    s = open_retrieval_set(data)
    assert s.name == "d" and s.slot == str(data.resolve())
    assert s.identity().digest == data_fingerprint(data, [r.image for r in s.records])
    write_coco(tmp_path / "coco")
    test = open_retrieval_set(f"coco-karpathy:{tmp_path / 'coco'}")
    val = open_retrieval_set(f"coco-karpathy:{tmp_path / 'coco'}", split="val")
    assert test.identity().digest != val.identity().digest and test.slot != val.slot


# ---------------------------------------------------------------------------------------------- image folders


def write_imagefolder(root, split="val", classes=("banana_split", "Zebra", "apple"), per_class=2):
    """PATH/<split>/<class>/*.png, classes created in unsorted order; a nested image and a non-image file too."""
    base = root / split if split else root
    for k, name in enumerate(classes):
        for j in range(per_class):
            png(base / name / f"{j}.png", (80 * k, 50 * j, 120))
        (base / name / "notes.txt").write_text("not an image")
    png(base / classes[0] / "nested" / "deep.png", (9, 9, 9))
    return base


def test_imagefolder_labels_follow_sorted_folders(tmp_path):
    write_imagefolder(tmp_path)
    zs = read_imagefolder(str(tmp_path))  # default: PATH/val
    assert zs.classnames == ["Zebra", "apple", "banana split"]  # sorted folders, _ as space
    assert zs.templates == ["a photo of a {}."]
    assert zs.name == f"{tmp_path.name}/val" and zs.settings["split"] == "val"
    labels = {p.split("/")[-2] if "nested" not in p else "banana_split": y for p, y in zs.items}
    assert labels == {"Zebra": 0, "apple": 1, "banana_split": 2}
    assert len(zs.items) == 7 and not any(p.endswith(".txt") for p, _ in zs.items)
    (tmp_path / "classnames.txt").write_text("zebra\n\napple\nbanana split\n")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\nitap of a {c} {with braces}\n")
    zs = read_imagefolder(str(tmp_path), split="val")
    assert zs.classnames == ["zebra", "apple", "banana split"]
    assert zs.templates == ["a photo of a {}.", "itap of a {} {{with braces}}"]
    assert zs.templates[1].format("cat") == "itap of a cat {with braces}"
    assert set(zs.files) == {"classnames", "templates"}
    flat = tmp_path / "flat"
    write_imagefolder(flat, split=None, classes=("b", "a"))
    zs = read_imagefolder(str(flat), templates="simple-imagenet")
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    assert zs.classnames == ["a", "b"] and zs.name == "flat" and zs.settings["split"] is None
    assert [t.format("dog") for t in zs.templates] == [t("dog") for t in SIMPLE_IMAGENET_TEMPLATES]
    cb = tmp_path / "cb"  # CLIP_benchmark's template file name
    write_imagefolder(cb, split="test", classes=("x", "y"))
    (cb / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    assert read_imagefolder(str(cb), split="test").templates == ["a {}"]


def test_imagefolder_builtin_imagenet_names_and_templates(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    wnids = tmp_path / "imagenet"  # ImageNet's WordNet-id folders sort into CLIP's class-name order
    for k in range(1000):
        (wnids / "val" / f"n{k:08d}").mkdir(parents=True)
    png(wnids / "val" / "n00000000" / "a.png", (1, 2, 3))
    for k in range(1, 1000):
        os.link(wnids / "val" / "n00000000" / "a.png", wnids / "val" / f"n{k:08d}" / "a.png")
    zs = read_imagefolder(str(wnids), classnames="openai-imagenet", templates="openai-imagenet")
    assert zs.classnames == list(IMAGENET_CLASSNAMES) and "classnames" not in zs.files
    assert [t.format("cat") for t in zs.templates] == [t("cat") for t in OPENAI_IMAGENET_TEMPLATES]
    assert zs.items[1] == (str(wnids / "val" / "n00000001" / "a.png"), 1) and len(zs.items) == 1000


def test_imagefolder_errors(tmp_path):
    base = write_imagefolder(tmp_path)
    (tmp_path / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"classnames.txt: 2 class names for 3 class folders .*first 'Zebra', last "
                                        r"'banana_split'"):
        read_imagefolder(str(tmp_path))
    (tmp_path / "classnames.txt").unlink()
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {c}\na photo of a {}\n")
    with pytest.raises(DataError, match=r"bad.txt:2: template 'a photo of a \{\}' has no \{c\} placeholder .*write "
                                        r"\{c\}"):
        read_imagefolder(str(tmp_path), templates=str(bad))
    with pytest.raises(DataError, match=r"openai-imagenet: 1000 class names for 3 class folders"):
        read_imagefolder(str(tmp_path), classnames="openai-imagenet")
    with pytest.raises(DataError, match=r"nope.txt: templates file not found.*built-in set: openai-imagenet"):
        read_imagefolder(str(tmp_path), templates=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"no split folder 'train' \(it holds: val\)"):
        read_imagefolder(str(tmp_path), split="train")
    (base / "empty_class").mkdir()
    (base / "empty_class" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"empty_class: class folder with no images"):
        read_imagefolder(str(tmp_path))
    with pytest.raises(DataError, match=r"image folder not found"):
        read_imagefolder(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))


def eval_retrieval(*args: str) -> int:
    return main(["eval", "retrieval", "--no-progress", "--device", "cpu", "--batch-size", "4", *args])


def test_eval_retrieval_on_coco_karpathy(tmp_path, model_dir, capsys):
    root = tmp_path / "coco"
    path = write_coco(root)
    cache, out = tmp_path / "cache", tmp_path / "res.json"
    spec = f"coco-karpathy:{root}"
    assert eval_retrieval("--model", str(model_dir), "--data", spec, "--split", "test", "--cache-dir", str(cache),
                          "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "coco-karpathy/test: 3 images, 16 captions (encoded" in printed
    result = json.loads(out.read_text())
    assert result["dataset"] == "coco-karpathy/test" and result["split"] == "test"
    assert result["num_images"] == 3 and result["num_texts"] == 16 and result["data"] == str(path.resolve())
    assert result["metrics"]["text_to_image_R@5"] == 1.0  # 3 images: every caption's image is in the top 5

    # the same split is served from the cache; another split is encoded and does not evict it
    assert eval_retrieval("--model", str(model_dir), "--data", spec, "--cache-dir", str(cache)) == 0
    assert "cached embeddings" in capsys.readouterr().out
    assert eval_retrieval("--model", str(model_dir), "--data", spec, "--split", "train", "--cache-dir",
                          str(cache)) == 0
    assert "coco-karpathy/train: 3 images, 16 captions (encoded" in capsys.readouterr().out
    assert eval_retrieval("--model", str(model_dir), "--data", spec, "--cache-dir", str(cache)) == 0
    assert "cached embeddings" in capsys.readouterr().out
    # a changed caption in the JSON is another data set
    data = json.loads(path.read_text())
    data["images"][4]["sentences"][0]["raw"] = "a different caption"
    path.write_text(json.dumps(data))
    assert eval_retrieval("--model", str(model_dir), "--data", spec, "--cache-dir", str(cache)) == 0
    assert "(encoded" in capsys.readouterr().out

    assert eval_retrieval("--model", str(model_dir), "--data", "coco:" + str(root), "--no-cache") == 2
    assert "unknown evaluation set 'coco'" in capsys.readouterr().err
    (root / "val2014" / "COCO_val2014_000000000005.jpg").unlink()  # not the split's first image
    assert eval_retrieval("--model", str(model_dir), "--data", spec, "--no-cache") == 2
    err = capsys.readouterr().err
    assert "dataset_coco.json: images[5] (COCO_val2014_000000000005.jpg)" in err and "missing" in err


def test_eval_zeroshot_on_imagefolder(tmp_path, model_dir, capsys):
    import open_clip

    from xmodal.tasks.zeroshot import load_zeroshot_data, run_zeroshot

    root = tmp_path / "in"
    write_imagefolder(root, classes=("cherry", "apple", "banana"), per_class=3)
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {c}.\na drawing of a {c}.\n")
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--data", f"imagefolder:{root}", "--split", "val",
                 "--templates", str(templates), "--batch-size", "4", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["dataset"] == "in/val" and metrics["split"] == "val"
    assert metrics["n"] == 10 and metrics["classes"] == 3

    data = load_zeroshot_data(f"imagefolder:{root}", templates=str(templates))
    assert data.classnames == ["apple", "banana", "cherry"]
    assert [y for _, y in data.images] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    # independent reference: the model, its transform and sorted-folder labels
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    direct = run_zeroshot(model.eval(), preprocess, tok, data, batch_size=3)
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert metrics[key] == pytest.approx(direct[key])

    assert main(["eval", "zeroshot", "--model", str(model_dir), "--data", f"coco-karpathy:{root}"]) == 2
    assert "coco-karpathy is a retrieval set" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--model", str(model_dir), "--data", str(root), "--split", "val"]) == 2
    assert "--split applies to named sets (imagefolder:PATH, wds:PATH)" in capsys.readouterr().err


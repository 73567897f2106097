"""Image-text data sets: CSV/TSV/JSONL reading, caption grouping, clear errors, skipping broken images."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.data.image_text import ImageTextDataset, collate_image_text, read_records
from xmodal.errors import ConfigError, DataError


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture()
def images(tmp_path):
    """Three small PNGs in tmp_path/img: a.png, b.png, c.png."""
    (tmp_path / "img").mkdir()
    for k, name in enumerate("abc"):
        Image.new("RGB", (8, 6), (40 * k, 100, 200)).save(tmp_path / "img" / f"{name}.png")
    return tmp_path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_comma_csv_groups_captions_per_image_in_order(images):
    f = write(images / "d.csv", 'filepath,title\nimg/a.png,"a red, round thing"\nimg/b.png,two\n'
              "./img/a.png,three\n")
    recs = read_records(f)
    assert [r.image for r in recs] == [str(images / "img" / "a.png"), str(images / "img" / "b.png")]
    assert recs[0].captions == ["a red, round thing", "three"] and recs[1].captions == ["two"]
    assert recs[0].line == 2 and recs[1].line == 3


def test_tab_separated_csv_is_detected_like_open_clip_writes_it(images):
    f = write(images / "d.csv", "filepath\ttitle\nimg/a.png\ta caption, with a comma\n")
    assert read_records(f)[0].captions == ["a caption, with a comma"]
    t = write(images / "d.tsv", "title\tfilepath\none\timg/b.png\ntwo\timg/b.png\n")
    rec, = read_records(t)
    assert rec.captions == ["one", "two"] and rec.image.endswith("b.png")


def test_custom_keys_and_separator(images):
    f = write(images / "d.txt", "pic|desc|extra\nimg/a.png|hello|x\n")
    rec, = read_records(f, image_key="pic", caption_key="desc", sep="|")
    assert rec.captions == ["hello"]


def test_absolute_paths_stay_absolute(images, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    f = write(other / "d.csv", f"filepath,title\n{images / 'img' / 'c.png'},x\n")
    assert read_records(f)[0].image == str(images / "img" / "c.png")


def test_jsonl_caption_and_captions_keys(images):
    f = write(images / "d.jsonl", json.dumps({"image": "img/a.png", "captions": ["one", "two"]}) + "\n\n"
              + json.dumps({"image": "img/b.png", "caption": "three"}) + "\n"
              + json.dumps({"image": "img/a.png", "captions": ["four"]}) + "\n")
    recs = read_records(f)
    assert [r.captions for r in recs] == [["one", "two", "four"], ["three"]]
    assert recs[1].line == 3
    g = write(images / "e.jsonl", json.dumps({"file": "img/c.png", "alt": "x"}) + "\n")
    assert read_records(g, image_key="file", caption_key="alt")[0].captions == ["x"]


def test_missing_column_names_file_columns_and_key(images):
    f = write(images / "d.csv", "image_file,text_body\nimg/a.png,x\n")
    with pytest.raises(DataError) as e:
        read_records(f)
    msg = str(e.value)
    assert str(f) in msg and "'image_file'" in msg and "'text_body'" in msg and "image_key" in msg
    g = write(images / "e.csv", "filepath,text_body\nimg/a.png,x\n")
    with pytest.raises(DataError, match=r"no caption column 'title'.*'filepath', 'text_body'.*caption_key"):
        read_records(g, caption_key="title")


def test_missing_jsonl_key_names_line_and_keys(images):
    f = write(images / "d.jsonl", json.dumps({"image": "img/a.png", "caption": "x"}) + "\n"
              + json.dumps({"img": "img/b.png", "caption": "y"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 has none of the usual image keys.*'img'.*image_key"):
        read_records(f)


@pytest.mark.parametrize(
    "name,text,pattern",
    [
        ("empty.csv", "", r"empty\.csv: empty file"),
        ("blank.csv", "\n\n", r"blank\.csv: empty file"),
        ("header.csv", "filepath,title\n", r"header\.csv: holds a header but no records"),
        ("cap.csv", "filepath,title\nimg/a.png,ok\nimg/b.png,  \n", r"cap\.csv:3: empty caption in 'title'"),
        ("img.tsv", "filepath\ttitle\n\tcaption\n", r"img\.tsv:2: empty or missing image path"),
        ("fields.csv", "filepath,title\nimg/a.png,a,b\n", r"fields\.csv:2: 3 fields where the header has 2"),
        ("empty.jsonl", "\n", r"empty\.jsonl: empty file"),
        ("bad.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": \n', r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", '["a.png", "x"]\n', r"list\.jsonl:1: expected a JSON object"),
        ("nocap.jsonl", '{"image": "a.png", "captions": []}\n', r"nocap\.jsonl:1: no captions"),
        ("d.parquet", "x", r"unknown image-text format '\.parquet'"),
    ],
)
def test_validation_errors_name_file_and_line(tmp_path, name, text, pattern):
    with pytest.raises(DataError, match=pattern):
        read_records(write(tmp_path / name, text))


def test_non_utf8_file_is_a_data_error(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"filepath,title\na.png,caf\xe9\n")
    with pytest.raises(DataError, match=r"d\.csv: not UTF-8"):
        read_records(tmp_path / "d.csv")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.csv")


def test_items_have_image_text_index(images):
    f = write(images / "d.csv", "filepath,title\nimg/a.png,first\nimg/b.png,second\nimg/a.png,third\n")
    ds = ImageTextDataset(f, to_tensor)
    assert len(ds) == 2
    item = ds[1]
    assert item["image"].shape == (3, 6, 8) and item["text"] == "second" and item["index"] == 1
    assert item["image_index"] == 1
    assert ds[-2]["text"] == "first"
    with pytest.raises(IndexError):
        ds[2]


def test_caption_sampling_modes(images):
    rows = "".join(f"img/a.png,a{k}\n" for k in range(6)) + "img/b.png,b0\nimg/b.png,b1\n"
    f = write(images / "d.csv", "filepath,title\n" + rows)
    all_ds = ImageTextDataset(f, to_tensor, caption_sampling="all")
    assert len(all_ds) == 8
    assert [all_ds[k]["text"] for k in range(8)] == [f"a{k}" for k in range(6)] + ["b0", "b1"]
    assert [all_ds[k]["image_index"] for k in range(8)] == [0] * 6 + [1, 1]
    rnd = ImageTextDataset(f, to_tensor, caption_sampling="random", seed=3)
    again = ImageTextDataset(f, to_tensor, caption_sampling="random", seed=3)
    assert len(rnd) == 2
    draws = []
    for epoch in range(8):
        rnd.set_epoch(epoch)
        again.set_epoch(epoch)
        assert rnd[0]["text"] == again[0]["text"]
        draws.append(rnd[0]["text"])
    assert len(set(draws)) > 1 and set(draws) <= {f"a{k}" for k in range(6)}
    assert ImageTextDataset(f, to_tensor)[0]["text"] == "a0"


def test_tokenizer_output_is_one_row_of_ids(images):
    import open_clip

    f = write(images / "d.csv", "filepath,title\nimg/a.png,a small red circle\nimg/b.png,a blue square\n")
    ds = ImageTextDataset(f, to_tensor, open_clip.get_tokenizer("RN50"))
    item = ds[0]
    assert item["text"].dtype == torch.long and item["text"].shape == (77,)
    batch = collate_image_text([ds[0], ds[1]])
    assert batch["text"].shape == (2, 77) and batch["image"].shape == (2, 3, 6, 8)


def _with_broken(images, broken: str):
    return write(images / "d.csv", f"filepath,title\nimg/a.png,ok\n{broken},bad one\nimg/b.png,fine\n")


def test_missing_image_raise_names_path_and_line(images):
    f = _with_broken(images, "img/missing.png")
    ds = ImageTextDataset(f, to_tensor, on_error="raise")
    with pytest.raises(DataError) as e:
        ds[1]
    msg = str(e.value)
    assert f"{f}:3" in msg and str(images / "img" / "missing.png") in msg and "file not found" in msg


def test_missing_image_skip_counts_and_logs_once(images, caplog):
    ds = ImageTextDataset(_with_broken(images, "img/missing.png"), to_tensor)
    with caplog.at_level(logging.WARNING, logger="xmodal.data.image_text"):
        assert ds[1] is None and ds[1] is None
    assert ds[0] is not None and ds[2] is not None
    assert ds.skipped == 1 and ds.skipped_images == [str(images / "img" / "missing.png")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "missing.png" in warnings[0] and "d.csv:3" in warnings[0]


def test_truncated_image_is_skipped_or_raised(images):
    data = (images / "img" / "c.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "img" / "big.png")
    (images / "img" / "trunc.png").write_bytes((images / "img" / "big.png").read_bytes()[:60])
    (images / "img" / "junk.png").write_bytes(b"not an image" + data[:5])
    for name in ("trunc.png", "junk.png"):
        f = _with_broken(images, f"img/{name}")
        with pytest.raises(DataError, match=rf"d\.csv:3: cannot read image .*{name}"):
            ImageTextDataset(f, to_tensor, on_error="raise")[1]
        ds = ImageTextDataset(f, to_tensor)
        assert ds[1] is None and ds.skipped == 1


def test_collate_drops_skipped_items(images):
    ds = ImageTextDataset(_with_broken(images, "img/missing.png"), to_tensor)
    batch = collate_image_text([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (2, 3, 6, 8) and batch["text"] == ["ok", "fine"]
    assert batch["index"].tolist() == [0, 2] and batch["skipped"] == 1
    assert collate_image_text([None, None]) is None


def test_dataloader_workers_share_the_skip_count(images):
    ds = ImageTextDataset(_with_broken(images, "img/missing.png"), to_tensor)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_image_text)
    batches = [b for b in loader if b is not None]
    assert sorted(i for b in batches for i in b["index"].tolist()) == [0, 2]
    assert ds.skipped == 1


def test_spawned_workers_and_pickling(images):
    ds = ImageTextDataset(_with_broken(images, "img/missing.png"), to_tensor, caption_sampling="all")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[0]["text"] == "ok" and clone[1] is None and clone.skipped == 1 and ds.skipped == 0
    loader = torch.utils.data.DataLoader(
        ds, batch_size=3, num_workers=1, collate_fn=collate_image_text, multiprocessing_context="spawn"
    )
    batch, = list(loader)
    assert batch["text"] == ["ok", "fine"] and ds.skipped == 1


def test_bad_options_are_config_errors(images):
    f = write(images / "d.csv", "filepath,title\nimg/a.png,x\n")
    with pytest.raises(ConfigError, match="did you mean 'raise'"):
        ImageTextDataset(f, on_error="rase")
    with pytest.raises(ConfigError, match="caption_sampling"):
        ImageTextDataset(f, caption_sampling="every")

"""`xmodal eval retrieval` end to end on a tiny local open_clip model and a synthetic image-text file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from xmodal.cli import main
from xmodal.tasks.retrieval import evaluate_retrieval

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local open_clip folder (config + weights) for a tiny CLIP."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(**TINY_CFG["vision_cfg"]),
        text_cfg=open_clip.model.CLIPTextCfg(**TINY_CFG["text_cfg"]),
    )
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")
    return root


def write_dataset(root, num_images: int = 6):
    """Coloured squares and a JSON-lines file with 2–3 captions per image."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_images):
        Image.new("RGB", (32, 32), (40 * i % 256, 255 - 30 * i, 20 * i)).save(root / f"img{i}.png")
        caps = [f"a square of colour {i}", f"colour number {i}"] + ([f"thing {i}"] if i % 2 else [])
        lines.append(json.dumps({"image": f"img{i}.png", "captions": caps}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str) -> int:
    return main(["eval", "retrieval", "--no-progress", *args])


def test_eval_retrieval_end_to_end(tmp_path, model_dir, capsys):
    data = write_dataset(tmp_path / "d")
    out = tmp_path / "res" / "results.json"
    cache = tmp_path / "cache"
    code = run_cli("--model", str(model_dir), "--data", str(data), "--out", str(out), "--cache-dir", str(cache),
                   "--batch-size", "4", "--device", "cpu")
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 images, 15 captions" in printed and "| image → text |" in printed
    result = json.loads(out.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(result)
    assert result["task"] == "zeroshot_retrieval" and result["dataset"] == "data"
    m = result["metrics"]
    for k in (1, 5, 10):
        assert m[f"image_retrieval_recall@{k}"] == m[f"text_to_image_R@{k}"]
        assert m[f"text_retrieval_recall@{k}"] == m[f"image_to_text_R@{k}"]
    assert m["text_to_image_R@10"] == 1.0  # only 6 images: every caption's image is in the top 10
    assert out.with_suffix(".md").read_text().startswith("| direction |")

    # independent path: encode with the model directly and evaluate the same mapping
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(data.parent / r["image"]).convert("RGB")) for r in records])
        img = model.encode_image(images)
        caps = [c for r in records for c in r["captions"]]
        txt = model.encode_text(tok(caps))
    mapping = [i for i, r in enumerate(records) for _ in r["captions"]]
    ref = evaluate_retrieval(img, txt, mapping)
    for key, value in ref.items():
        if "_R@" in key:  # fp16 storage can only move near-ties; recall on 6 images is robust to it
            assert m[key] == pytest.approx(value)

    # a second run reuses the cached embeddings
    assert run_cli("--model", str(model_dir), "--data", str(data), "--cache-dir", str(cache)) == 0
    assert "cached embeddings" in capsys.readouterr().out


def test_approximate_index_option(tmp_path, model_dir, capsys):
    data = write_dataset(tmp_path / "d")
    out = tmp_path / "r.json"
    assert run_cli("--model", str(model_dir), "--data", str(data), "--no-cache", "--index", "hnsw",
                   "--index-param", "ef_search=64", "--out", str(out), "--ks", "1", "3") == 0
    m = json.loads(out.read_text())["metrics"]
    assert "image_to_text_index_recall@3" in m and "text_to_image_R@3" in m and "image_retrieval_recall@1" in m


def test_bad_input_exits_with_a_message(tmp_path, model_dir, capsys):
    data = write_dataset(tmp_path / "d")
    os.remove(tmp_path / "d" / "img4.png")
    assert run_cli("--model", str(model_dir), "--data", str(data), "--no-cache") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "img4.png" in err and "data.jsonl:5" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_cli("--model", str(model_dir), "--data", str(empty), "--no-cache") == 2
    assert "empty" in capsys.readouterr().err

    assert run_cli("--data", str(data)) == 2
    assert "no model given" in capsys.readouterr().err
    assert run_cli("--model", str(model_dir), "--checkpoint", str(model_dir), "--data", str(data)) == 2
    assert "not both" in capsys.readouterr().err
    assert run_cli("--model", str(model_dir), "--data", str(data), "--index", "hnws") == 2
    assert "did you mean 'hnsw'" in capsys.readouterr().err
    assert run_cli("--model", str(model_dir), "--data", str(data), "--index-param", "m=8") == 2
    assert "approximate indexes" in capsys.readouterr().err


def test_results_are_not_written_on_failure(tmp_path, model_dir):
    data = write_dataset(tmp_path / "d")
    out = tmp_path / "r.json"
    out.write_text("old")
    os.remove(tmp_path / "d" / "img0.png")
    assert run_cli("--model", str(model_dir), "--data", str(data), "--no-cache", "--out", str(out)) == 2
    assert out.read_text() == "old"
    assert not np.any([p.name.endswith(".tmp") for p in tmp_path.iterdir()])


def clip_benchmark_row(result: dict) -> dict:
    """What CLIP_benchmark's `build` step does with one results file: metrics and fields in one row, and
    `model_fullname` = model + " " + pretrained (string concatenation: a null pretrained crashes it)."""
    row = {**result["metrics"], **{k: v for k, v in result.items() if k != "metrics"}}
    row["model_fullname"] = row["model"] + " " + row["pretrained"]
    return row


def test_results_feed_clip_benchmark_build(tmp_path, model_dir):
    import csv

    data = write_dataset(tmp_path / "d")
    rows = []
    # a model folder without a pretrained tag, then the same weights as --pretrained FILE
    for i, extra in enumerate([(), ("--pretrained", str(model_dir / "open_clip_pytorch_model.bin"))]):
        out = tmp_path / f"r{i}.json"
        assert run_cli("--model", str(model_dir), *extra, "--data", str(data), "--no-cache", "--out", str(out)) == 0
        result = json.loads(out.read_text())
        assert isinstance(result["model"], str) and isinstance(result["pretrained"], str)
        rows.append(clip_benchmark_row(result))
    assert rows[0]["pretrained"] == "" and rows[1]["pretrained"].endswith("open_clip_pytorch_model.bin")
    with open(tmp_path / "benchmark.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted(set().union(*rows)))
        writer.writeheader()
        writer.writerows(rows)
    assert rows[0]["ties"] == "pessimistic"


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, model_dir):
    """The tiny CLIP with a NaN in its image projection: a broken model."""
    root = tmp_path_factory.mktemp("nan_clip")
    state = torch.load(model_dir / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.proj"][0, 0] = float("nan")
    (root / "open_clip_config.json").write_text((model_dir / "open_clip_config.json").read_text())
    torch.save(state, root / "open_clip_pytorch_model.bin")
    return root


@pytest.mark.parametrize("options", [("--no-cache",), ("--no-cache", "--index", "hnsw"), ()])
def test_nan_embeddings_are_an_error_not_a_recall(tmp_path, nan_model_dir, capsys, options):
    data = write_dataset(tmp_path / "d")
    out = tmp_path / "r.json"
    code = run_cli("--model", str(nan_model_dir), "--data", str(data), "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), *options)
    assert code == 2
    captured = capsys.readouterr()
    assert "NaN" in captured.err and "image" in captured.err
    assert "R@" not in captured.out and not out.exists()

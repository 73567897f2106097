"""Zero-shot classification: classifier construction, metrics, task files, and the `xmodal eval zeroshot` command."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from xmodal.cli import main
from xmodal.errors import DataError
from xmodal.students.clip import create_student
from xmodal.students.export import export_open_clip
from xmodal.tasks.zeroshot import (
    ZeroShotData,
    build_zeroshot_classifier,
    evaluate_zeroshot,
    read_zeroshot_file,
    run_zeroshot,
    zeroshot_metrics,
)

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tokenizer():
    from open_clip import SimpleTokenizer

    return SimpleTokenizer(context_length=16)


def test_metrics_top1_top5_and_mean_per_class_recall():
    # 4 samples of class 0 (3 right), 1 sample of class 1 (wrong, but in the top 2)
    logits = torch.tensor([
        [5.0, 1, 0], [5.0, 1, 0], [5.0, 1, 0], [0.0, 5, 1],
        [5.0, 1, 0],
    ])
    labels = torch.tensor([0, 0, 0, 0, 1])
    m = zeroshot_metrics(logits, labels)
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["top5"] == pytest.approx(1.0)  # only 3 classes: top-5 is top-3
    assert m["mean_per_class_recall"] == pytest.approx((3 / 4 + 0 / 1) / 2)  # class 2 has no samples: skipped
    assert m["n"] == 5 and m["classes"] == 3
    wide = torch.zeros(2, 10)
    wide[0, 9], wide[0, 1] = 3, 2  # label 1 is second → top-5 hit, top-1 miss
    wide[1, :6] = torch.arange(6.0)  # label 0 is sixth → miss
    m = zeroshot_metrics(wide, torch.tensor([1, 0]))
    assert m["top1"] == 0.0 and m["top5"] == pytest.approx(0.5)


def test_classifier_is_mean_of_normalised_template_embeddings(tokenizer):
    torch.manual_seed(0)
    model = create_student(CFG).eval()
    classes, templates = ["red circle", "blue square", "green star"], ["a photo of a {}.", "a {} shape."]
    clf = build_zeroshot_classifier(model, tokenizer, classes, templates, "cpu", classes_per_batch=2)
    assert clf.shape == (32, 3)
    with torch.no_grad():
        for c, name in enumerate(classes):
            e = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            expected = F.normalize(e.mean(0), dim=0)
            assert torch.allclose(clf[:, c], expected, atol=1e-6)
    assert torch.allclose(clf.norm(dim=0), torch.ones(3), atol=1e-6)
    assert not model.training


class ToyModel(nn.Module):
    """encode_image returns the input's first D values: a classifier of identity columns reads them out."""

    def encode_image(self, x):
        return x.flatten(1)[:, :4]


def test_evaluate_reads_tuples_and_dict_batches():
    feats = torch.eye(4)[[0, 1, 2, 3, 3, 0]]
    labels = torch.tensor([0, 1, 2, 3, 2, 1])  # the last two are wrong
    clf = torch.eye(4)
    tuples = [(feats[:4], labels[:4]), (feats[4:], labels[4:])]
    m = evaluate_zeroshot(ToyModel(), clf, tuples)
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1) / 4)
    dicts = [{"image": feats, "label": labels.tolist()}]
    assert evaluate_zeroshot(ToyModel(), clf, dicts)["top1"] == pytest.approx(4 / 6)
    with pytest.raises(DataError, match="width 4 but the classifier is"):
        evaluate_zeroshot(ToyModel(), torch.eye(8), tuples)


def test_read_task_file_formats_and_errors(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    task = {"classnames": ["red", "blue"], "templates": ["a {} thing"],
            "images": [{"image": "a.png", "label": 0}, {"filepath": str(tmp_path / "a.png"), "label": 1}]}
    (tmp_path / "zeroshot.json").write_text(json.dumps(task))
    data = read_zeroshot_file(tmp_path)  # a folder holding zeroshot.json
    assert data.images == [(str(tmp_path / "a.png"), 0), (str(tmp_path / "a.png"), 1)]

    def bad(mutate, match):
        t = json.loads(json.dumps(task))
        mutate(t)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(t))
        with pytest.raises(DataError, match=match):
            read_zeroshot_file(p)

    bad(lambda t: t.pop("templates"), "missing key 'templates'")
    bad(lambda t: t["templates"].append("no placeholder"), r"templates\[1\].*placeholder")
    bad(lambda t: t["images"][1].update(label=2), r"images\[1\] label 2 is not a class index in \[0, 2\)")
    bad(lambda t: t["images"][0].pop("image"), r"images\[0\] needs 'filepath'")
    with pytest.raises(DataError, match="not found"):
        read_zeroshot_file(tmp_path / "missing.json")


def test_missing_image_names_the_file(tmp_path, tokenizer):
    model = create_student(CFG).eval()
    data = ZeroShotData(["a", "b"], ["{}"], [(str(tmp_path / "gone.png"), 0)], "task.json")
    from xmodal.students.clip import student_transforms

    with pytest.raises(DataError, match=r"task.json: image 0 \(.*gone.png\) cannot be read"):
        run_zeroshot(model, student_transforms(model)[1], tokenizer, data)


def test_eval_zeroshot_command_on_synthetic_scenes(tmp_path, tokenizer):
    from xmodal.data.scenes import generate_scene_dataset
    from xmodal.students.clip import student_transforms

    world = tmp_path / "world"
    generate_scene_dataset(world, 4, 2, 24, seed=0, image_size=32, zeroshot_per_class=1, progress=False)
    torch.manual_seed(0)
    model = create_student(CFG).eval()
    folder = export_open_clip(model, CFG, tmp_path / "model")
    out = tmp_path / "metrics.json"
    code = main(["eval", "zeroshot", "--model", str(folder), "--data", str(world), "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads(out.read_text())
    data = read_zeroshot_file(world / "zeroshot.json")
    assert metrics["n"] == len(data.images) > 0 and metrics["classes"] == len(data.classnames)
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert 0.0 <= metrics[key] <= 1.0
    # same numbers as the Python API with the same model
    direct = run_zeroshot(model, student_transforms(model)[1], tokenizer, data, batch_size=5)
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert metrics[key] == pytest.approx(direct[key])
    assert main(["eval", "zeroshot", "--model", str(folder), "--data", str(tmp_path / "nope")]) == 2

"""Class lists, the base/novel split and HM against hand-computed cases, and the stored teacher class vectors."""

import math

import open_clip
import pytest
import torch
from conftest import tiny_clip_cfg

from xmodal.errors import CheckpointError, DataError
from xmodal.openclip import bundle_model
from xmodal.tasks.prompt.classes import (
    ClassList,
    base_novel_split,
    harmonic_mean,
    load_class_vectors,
    obtain_class_vectors,
)
from xmodal.tasks.prompt.evaluate import Selection, accuracy_over, base_novel_metrics
from xmodal.tasks.zeroshot import build_zeroshot_classifier


def test_base_novel_split_sorts_by_name_and_takes_the_first_half_rounded_up():
    names = ["zebra", "apple", "mango", "kiwi", "banana"]
    base, novel = base_novel_split(names)
    assert base == [1, 4, 3]  # apple, banana, kiwi (⌈5/2⌉ = 3)
    assert novel == [2, 0]  # mango, zebra
    assert base_novel_split(["b", "a"]) == ([1], [0])
    with pytest.raises(DataError, match="two classes"):
        base_novel_split(["only"])


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(1.0, 0.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0


def test_base_and_novel_accuracy_each_over_its_own_class_set_by_hand():
    # classes by name: a(0) b(1) | c(2) d(3); base = {a, b}, novel = {c, d}
    names = ["a", "b", "c", "d"]
    w = torch.eye(4)
    emb = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],  # a → a: right
        [0.2, 0.1, 0.9, 0.0],  # b: overall nearest is c (novel), but over base {a, b} it is a: wrong
        [0.0, 0.6, 0.0, 0.5],  # b: overall nearest b; over base b: right
        [0.0, 0.0, 0.3, 0.7],  # c → d: wrong
        [0.9, 0.0, 0.6, 0.1],  # c: overall nearest a (base), over novel {c, d} it is c: right
        [0.0, 0.0, 0.1, 0.8],  # d → d: right
    ])
    labels = torch.tensor([0, 1, 1, 2, 2, 3])
    m = base_novel_metrics(emb, labels, w, names)
    assert m["base"] == pytest.approx(2 / 3) and m["n_base"] == 3
    assert m["novel"] == pytest.approx(2 / 3) and m["n_novel"] == 3
    assert m["hm"] == pytest.approx(2 / 3)
    assert m["all"] == pytest.approx(3 / 6)  # over all four classes images 2 and 5 are also wrong
    acc, n = accuracy_over(emb, labels, w, [2, 3])
    assert (acc, n) == (pytest.approx(2 / 3), 3)
    with pytest.raises(DataError, match="novel"):
        base_novel_metrics(emb[:3], labels[:3], w, names)


def test_class_list_checks_name_what_is_wrong():
    with pytest.raises(DataError, match="empty"):
        ClassList([], ["a {}."], "x.json").check()
    with pytest.raises(DataError, match=r"template 1 .*placeholder"):
        ClassList(["cat", "dog"], ["a {}.", "a photo"], "x.json").check()
    with pytest.raises(DataError, match="listed twice"):
        ClassList(["cat", "cat"], ["a {}."]).check()
    with pytest.raises(DataError, match="no prompt templates"):
        ClassList(["cat", "dog"], []).check()


def test_selection_keeps_the_best_validation_value_and_its_prompts(tmp_path):
    sel = Selection("hm", tmp_path)
    saved = []
    for step, value in [(10, 0.2), (20, 0.5), (30, 0.5), (40, 0.3)]:
        sel.update(value, step, lambda p, s=step: saved.append(s) or p.write_text(str(s)))
    assert (sel.best, sel.step) == (0.5, 20) and saved == [10, 20]  # a tie keeps the earlier step
    assert sel.prompts_path.read_text() == "20"
    again = Selection("hm", tmp_path)
    again.restore()
    assert (again.best, again.step) == (0.5, 20)
    with pytest.raises(DataError):
        sel.update(math.nan, 50, lambda p: None)


# ---------------------------------------------------------------------------------------------- class vectors


def teacher_bundle(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_clip_cfg()
    model = open_clip.model.CLIP(**cfg).eval().requires_grad_(False)
    return bundle_model(model, cfg)


class Counter:
    """Counts calls of a model's text tower (encode_text)."""

    def __init__(self, model):
        self.calls = 0
        original = model.encode_text

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        model.encode_text = counted


CLASSES = ClassList(["red circle", "blue square", "green star"], ["a {}.", "a photo of a {}.", "one {}"])


def test_class_vectors_are_computed_once_then_read_without_the_text_tower(tmp_path):
    teacher = teacher_bundle()
    counter = Counter(teacher.model)
    cv = obtain_class_vectors(teacher, CLASSES, store_dir=tmp_path)
    assert counter.calls > 0 and cv.path.is_file()
    expected = build_zeroshot_classifier(teacher.model, teacher.tokenizer, CLASSES.names, CLASSES.templates).t()
    assert torch.allclose(cv.vectors, expected, atol=1e-6)
    assert torch.allclose(cv.vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    counter.calls = 0
    again = obtain_class_vectors(teacher, CLASSES, store_dir=tmp_path)
    assert counter.calls == 0
    assert torch.equal(again.vectors, cv.vectors) and again.fingerprint == cv.fingerprint
    assert not list(tmp_path.glob(".*.tmp"))


def test_stored_class_vectors_for_another_teacher_class_list_or_templates_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    obtain_class_vectors(teacher_bundle(0), CLASSES, path=path)
    with pytest.raises(CheckpointError, match="teacher differs"):
        obtain_class_vectors(teacher_bundle(1), CLASSES, path=path)
    with pytest.raises(CheckpointError, match="holds class vectors for 3 classes.*has 2"):
        obtain_class_vectors(teacher_bundle(0), ClassList(["a", "b"], ["{}"]), path=path)
    with pytest.raises(CheckpointError, match="classnames"):
        obtain_class_vectors(teacher_bundle(0), ClassList(["x", "y", "z"], CLASSES.templates), path=path)
    with pytest.raises(CheckpointError, match="templates"):
        obtain_class_vectors(teacher_bundle(0), ClassList(CLASSES.names, ["{}!"]), path=path)
    assert load_class_vectors(path).classes.names == CLASSES.names


def test_a_failing_computation_leaves_no_file(tmp_path):
    teacher = teacher_bundle()

    def broken(*args, **kwargs):
        raise RuntimeError("text tower failed")

    teacher.model.encode_text = broken
    with pytest.raises(RuntimeError, match="text tower failed"):
        obtain_class_vectors(teacher, CLASSES, path=tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []

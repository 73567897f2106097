"""Retrieval metrics: blocked exact ranks against a direct brute-force computation, tie rules, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xmodal.errors import ConfigError, DataError
from xmodal.tasks.retrieval import (
    clip_benchmark_result,
    evaluate_retrieval,
    first_positive_ranks,
    markdown_table,
)


def random_data(num_images=60, dim=16, seed=0, noise=1.0):
    """Images with 1–6 captions each (captions shuffled), captions = noisy copies of their image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, dim, generator=g)
    counts = torch.randint(1, 7, (num_images,), generator=g)
    mapping = torch.repeat_interleave(torch.arange(num_images), counts)
    mapping = mapping[torch.randperm(len(mapping), generator=g)]
    texts = images[mapping] + noise * torch.randn(len(mapping), dim, generator=g)
    return images, texts, mapping


def brute_ranks(images, texts, mapping, ties="pessimistic", normalize=True):
    """Full score matrix and positive mask; rank = 1 + #non-positives scoring ≥ (or >) the best positive."""
    if normalize:
        images = torch.nn.functional.normalize(images, dim=1)
        texts = torch.nn.functional.normalize(texts, dim=1)
    scores = texts @ images.T
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[torch.arange(len(texts)), mapping] = True

    def ranks(s, p):
        best = torch.where(p, s, -torch.inf).max(dim=1).values[:, None]
        above = s >= best if ties == "pessimistic" else s > best
        return (1 + (above & ~p).sum(dim=1)).numpy()

    return ranks(scores.T, pos.T), ranks(scores, pos)


def topk_hits(images, texts, mapping, k):
    """The standard definition, directly: a query is a hit when any positive is among its top-k documents."""
    images = torch.nn.functional.normalize(images, dim=1)
    texts = torch.nn.functional.normalize(texts, dim=1)
    scores = texts @ images.T
    t2i_top = scores.topk(k, dim=1).indices
    t2i = (t2i_top == mapping[:, None]).any(dim=1).double().mean().item()
    i2t_top = scores.T.topk(k, dim=1).indices  # caption ids
    i2t = (mapping[i2t_top] == torch.arange(len(images))[:, None]).any(dim=1).double().mean().item()
    return i2t, t2i


@pytest.mark.parametrize("block_bytes", [4 * 7 * 5, 4 * 300, 128 * 2**20])
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_ranks_match_brute_force(block_bytes, ties):
    images, texts, mapping = random_data()
    ranks = first_positive_ranks(images, texts, mapping, ties=ties, block_bytes=block_bytes)
    ref_i2t, ref_t2i = brute_ranks(images, texts, mapping, ties)
    np.testing.assert_array_equal(ranks.image_to_text, ref_i2t)
    np.testing.assert_array_equal(ranks.text_to_image, ref_t2i)
    assert ranks.image_to_text.min() >= 1 and ranks.text_to_image.max() <= len(images)


def test_metrics_match_direct_definition():
    images, texts, mapping = random_data(num_images=80, noise=1.5, seed=3)
    metrics = evaluate_retrieval(images, texts, mapping, ks=(1, 5, 10), block_bytes=4 * 64 * 80)
    for k in (1, 5, 10):
        i2t, t2i = topk_hits(images, texts, mapping, k)
        assert metrics[f"image_to_text_R@{k}"] == pytest.approx(i2t, abs=1e-12)
        assert metrics[f"text_to_image_R@{k}"] == pytest.approx(t2i, abs=1e-12)
    ref_i2t, ref_t2i = brute_ranks(images, texts, mapping)
    assert metrics["image_to_text_median_rank"] == float(np.median(ref_i2t))
    assert metrics["text_to_image_mean_rank"] == pytest.approx(float(np.mean(ref_t2i)))
    # not trivially perfect: the data is hard enough for misses in both directions
    assert 0 < metrics["image_to_text_R@1"] < 1 and 0 < metrics["text_to_image_R@1"] < 1


def test_ties_follow_the_documented_rule():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(-1, 2, (30, 3), generator=g).float()  # small integers: many exact ties
    mapping = torch.arange(90) % 30
    texts = torch.randint(-1, 2, (90, 3), generator=g).float()
    for ties in ("pessimistic", "optimistic"):
        ranks = first_positive_ranks(images, texts, mapping, ties=ties, normalize=False, block_bytes=4 * 11 * 7)
        ref_i2t, ref_t2i = brute_ranks(images, texts, mapping, ties, normalize=False)
        np.testing.assert_array_equal(ranks.image_to_text, ref_i2t)
        np.testing.assert_array_equal(ranks.text_to_image, ref_t2i)


def test_constant_model_gets_no_credit_from_ties():
    images = torch.ones(5, 4)
    texts = torch.ones(10, 4)
    mapping = torch.arange(10) // 2
    pess = first_positive_ranks(images, texts, mapping)
    assert (pess.text_to_image == 5).all()  # every other image ties with the positive
    assert (pess.image_to_text == 9).all()  # 8 non-positive captions tie with the 2 positives
    opt = first_positive_ranks(images, texts, mapping, ties="optimistic")
    assert (opt.text_to_image == 1).all() and (opt.image_to_text == 1).all()


def test_ties_do_not_depend_on_document_order():
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 3, (25, 2), generator=g).float()
    mapping = torch.randint(0, 25, (75,), generator=g)
    mapping[:25] = torch.arange(25)
    texts = torch.randint(0, 3, (75, 2), generator=g).float()
    base = first_positive_ranks(images, texts, mapping, normalize=False)
    perm_i = torch.randperm(25, generator=g)  # new position j holds old image perm_i[j]
    inv_i = torch.argsort(perm_i)
    perm_t = torch.randperm(75, generator=g)
    shuffled = first_positive_ranks(images[perm_i], texts[perm_t], inv_i[mapping[perm_t]], normalize=False)
    np.testing.assert_array_equal(shuffled.image_to_text, base.image_to_text[perm_i.numpy()])
    np.testing.assert_array_equal(shuffled.text_to_image, base.text_to_image[perm_t.numpy()])


def test_fp16_memmap_input(tmp_path):
    images, texts, mapping = random_data(seed=5)
    img = np.lib.format.open_memmap(tmp_path / "i.npy", mode="w+", dtype=np.float16, shape=tuple(images.shape))
    txt = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float16, shape=tuple(texts.shape))
    img[:], txt[:] = images.numpy(), texts.numpy()
    img.flush(), txt.flush()
    img = np.load(tmp_path / "i.npy", mmap_mode="r")
    txt = np.load(tmp_path / "t.npy", mmap_mode="r")
    ranks = first_positive_ranks(img, txt, mapping.numpy(), block_bytes=4 * 50 * 60)
    ref_i2t, ref_t2i = brute_ranks(torch.from_numpy(img.astype(np.float32)), torch.from_numpy(txt.astype(np.float32)),
                                   mapping)
    np.testing.assert_array_equal(ranks.image_to_text, ref_i2t)
    np.testing.assert_array_equal(ranks.text_to_image, ref_t2i)


def test_result_formats():
    images, texts, mapping = random_data(seed=7)
    metrics = evaluate_retrieval(images, texts, mapping, ks=(1, 5))
    assert set(metrics) == {
        f"{d}_{m}" for d in ("image_to_text", "text_to_image") for m in ("R@1", "R@5", "median_rank", "mean_rank")
    }
    result = clip_benchmark_result(metrics, dataset="toy", model="ViT-B-32", pretrained="openai")
    assert result["task"] == "zeroshot_retrieval" and result["dataset"] == "toy"
    assert result["metrics"]["image_retrieval_recall@5"] == metrics["text_to_image_R@5"]
    assert result["metrics"]["text_retrieval_recall@1"] == metrics["image_to_text_R@1"]
    json.dumps(result)
    table = markdown_table(metrics)
    assert "| image → text |" in table and "| text → image |" in table
    assert f"{100 * metrics['image_to_text_R@5']:.2f}" in table


@pytest.mark.parametrize(
    "case, match",
    [
        ("dim", "dim 16 but text embeddings have dim 8"),
        ("nan", "text embeddings row 7"),
        ("empty", "empty"),
        ("range", "caption 3 points to image 99"),
        ("orphan", "no caption"),
        ("length", "one image index per caption"),
    ],
)
def test_bad_input_is_named(case, match):
    images, texts, mapping = random_data(num_images=10, seed=9)
    if case == "dim":
        texts = texts[:, :8]
    elif case == "nan":
        texts = texts.clone()
        texts[7, 2] = float("nan")
    elif case == "empty":
        images = images[:0]
    elif case == "range":
        mapping = mapping.clone()
        mapping[3] = 99
    elif case == "orphan":
        mapping = torch.where(mapping == 4, 5, mapping)
    elif case == "length":
        mapping = mapping[:-1]
    with pytest.raises(DataError, match=match):
        evaluate_retrieval(images, texts, mapping)


def test_bad_options():
    images, texts, mapping = random_data(num_images=5)
    with pytest.raises(ConfigError, match="ties"):
        first_positive_ranks(images, texts, mapping, ties="random")
    with pytest.raises(ConfigError, match="positive integers"):
        evaluate_retrieval(images, texts, mapping, ks=(0, 5))
    with pytest.raises(ConfigError, match="unknown retrieval index"):
        evaluate_retrieval(images, texts, mapping, index="hnws")


# --- exact duplicates: the tie rule must hold bit-exactly, not by luck of rounding --------------------------

def duplicated_images(num_images=1000, copies=200, dim=32, seed=0):
    """The last `copies` images are exact copies of the first ones; two captions per image, close to it."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, dim, generator=g)
    images[num_images - copies :] = images[:copies]
    mapping = torch.arange(2 * num_images) % num_images
    texts = images[mapping] + 0.05 * torch.randn(len(mapping), dim, generator=g)
    duplicated = (mapping < copies) | (mapping >= num_images - copies)
    return images, texts, mapping, duplicated.numpy()


def duplicated_captions(num_images=1000, copies=200, dim=32, seed=1):
    """Two captions per image; image i < `copies` also lends an exact copy of its best caption to image i + 500."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, dim, generator=g)
    mapping = torch.arange(2 * num_images) % num_images
    texts = images[mapping] + 0.05 * torch.randn(len(mapping), dim, generator=g)
    cos = torch.nn.functional.cosine_similarity(texts, images[mapping], dim=1).view(2, num_images)
    best = torch.arange(copies) + num_images * cos[:, :copies].argmax(dim=0)  # each image's best caption
    texts = torch.cat([texts, texts[best]])
    mapping = torch.cat([mapping, torch.arange(copies) + 500])
    return images, texts, mapping


@pytest.fixture(params=["one tile", "small tiles", "second pass", "small tiles, second pass"])
def ranking_mode(request, monkeypatch):
    """Keyword arguments (and patches) that send `first_positive_ranks` down each of its code paths."""
    from xmodal.tasks.retrieval import metrics

    if "second pass" in request.param:  # as if the near-threshold scores had overflowed their buffer
        monkeypatch.setattr(metrics._Band, "finish", lambda self, exact, compare: None)
    return {"block_bytes": 4 * 256 * 300} if "small tiles" in request.param else {}


def test_duplicate_images_tie_with_the_positive(ranking_mode):
    images, texts, mapping, duplicated = duplicated_images()
    pess = first_positive_ranks(images, texts, mapping, **ranking_mode)
    # the copy of a caption's image scores exactly like its image: pessimistically it ranks above it
    assert (pess.text_to_image[duplicated] >= 2).all()
    assert (pess.text_to_image[duplicated] == 2).all() and (pess.text_to_image[~duplicated] == 1).all()
    assert (pess.image_to_text[~duplicated[:1000]] == 1).all()  # (an image and its copy share 4 captions)
    opt = first_positive_ranks(images, texts, mapping, ties="optimistic", **ranking_mode)
    assert (opt.text_to_image == 1).all() and (opt.image_to_text[~duplicated[:1000]] == 1).all()
    metrics = evaluate_retrieval(images, texts, mapping, ks=(1, 2), **ranking_mode)
    assert metrics["text_to_image_R@1"] == pytest.approx(1 - duplicated.mean())
    assert metrics["text_to_image_R@2"] == 1.0


def test_duplicate_captions_tie_with_the_positive(ranking_mode):
    images, texts, mapping = duplicated_captions()
    pess = first_positive_ranks(images, texts, mapping, **ranking_mode)
    assert (pess.image_to_text[:200] == 2).all() and (pess.image_to_text[200:] == 1).all()
    opt = first_positive_ranks(images, texts, mapping, ties="optimistic", **ranking_mode)
    assert (opt.image_to_text == 1).all()
    # the lent copies are closest to the image they were copied from: genuine misses, in both rules
    assert (pess.text_to_image[2000:] >= 2).all() and (opt.text_to_image[2000:] >= 2).all()


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_every_code_path_matches_brute_force(ranking_mode, ties):
    images, texts, mapping = random_data(num_images=300)
    ranks = first_positive_ranks(images, texts, mapping, ties=ties, **ranking_mode)
    ref_i2t, ref_t2i = brute_ranks(images, texts, mapping, ties)
    np.testing.assert_array_equal(ranks.image_to_text, ref_i2t)
    np.testing.assert_array_equal(ranks.text_to_image, ref_t2i)
    g = torch.Generator().manual_seed(1)  # small integers: many exact ties, every score exact in fp32
    images = torch.randint(-1, 2, (300, 3), generator=g).float()
    texts = torch.randint(-1, 2, (900, 3), generator=g).float()
    mapping = torch.arange(900) % 300
    ranks = first_positive_ranks(images, texts, mapping, ties=ties, normalize=False, **ranking_mode)
    ref_i2t, ref_t2i = brute_ranks(images, texts, mapping, ties, normalize=False)
    np.testing.assert_array_equal(ranks.image_to_text, ref_i2t)
    np.testing.assert_array_equal(ranks.text_to_image, ref_t2i)


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_broken_embeddings_are_an_error_not_a_recall(side, index):
    """NaN, or values whose norm overflows fp32 (normalised to zero vectors, they would tie everywhere)."""
    images, texts, mapping = random_data(num_images=20, seed=4)
    for bad in (float("nan"), 1e30):
        emb = (images if side == "image" else texts).clone()
        emb[3] = bad
        args = (emb, texts) if side == "image" else (images, emb)
        with pytest.raises(DataError, match=f"{side} embeddings row 3"):
            evaluate_retrieval(*args, mapping, index=index, recall_sample=5)


def test_unnormalised_scores_that_overflow_are_an_error():
    images, texts, mapping = random_data(num_images=20, seed=4)
    with pytest.raises(DataError, match="overflow fp32"):
        first_positive_ranks(images * 1e20, texts * 1e20, mapping, normalize=False)


def test_too_many_near_ties_fall_back_to_a_second_pass(monkeypatch):
    from xmodal.tasks.retrieval import metrics

    images, texts, mapping, _ = duplicated_images(num_images=300, copies=60)
    expected = first_positive_ranks(images, texts, mapping, block_bytes=4 * 64 * 100)
    monkeypatch.setattr(metrics, "_BAND_CAP", 0)  # any kept near-tie overflows the buffer
    calls = []
    second = metrics._count_with_exact_thresholds
    monkeypatch.setattr(metrics, "_count_with_exact_thresholds", lambda *a, **k: calls.append(k) or second(*a, **k))
    ranks = first_positive_ranks(images, texts, mapping, block_bytes=4 * 64 * 100)
    assert calls and calls[0]["texts_needed"]  # the duplicated images tie in the text→image direction
    np.testing.assert_array_equal(ranks.text_to_image, expected.text_to_image)
    np.testing.assert_array_equal(ranks.image_to_text, expected.image_to_text)

"""A recall target chooses an approximate index's search setting (HNSW efSearch, IVF nprobe) by measuring against
exact search: a low setting misses the target, the chosen one meets it on every query, an unreachable target is
reported as NOT MET with the recall reached, and exact search ignores a target."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.tasks.retrieval import evaluate_retrieval, markdown_table
from xmodal.tasks.retrieval.search import (
    build_index,
    doubling,
    exact_topk,
    index_recall,
    pair_scores,
    search_index,
    search_knob,
    tune_search,
)

K = 10
HNSW = {"m": 8, "ef_construction": 40}  # a sparse graph: efSearch 16 finds about 3/4 of the exact top-10 here


def clustered(num: int, dim: int = 32, centres: int = 50, spread: float = 0.35, seed: int = 0) -> torch.Tensor:
    """Unit vectors around `centres` random unit centres (seeded): neighbours crowd, as in real embeddings."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(centres, dim, generator=g), dim=1)
    which = torch.randint(0, centres, (num,), generator=g)
    return torch.nn.functional.normalize(mu[which] + spread * torch.randn(num, dim, generator=g), dim=1)


@pytest.fixture(scope="module")
def corpus():
    docs = clustered(2000, seed=0)
    queries = clustered(2400, seed=0)[2000:]  # the same centres, other points
    exact_s, exact_i = exact_topk(queries, docs, K)
    return queries, docs, exact_i


def full_recall(index, queries, docs, exact_ids) -> float:
    """k-recall@k of the index (as currently set) on every query, ties at the cut counted."""
    _, ids = search_index(index, queries, K)
    return index_recall(ids, exact_ids, pair_scores(queries, docs, ids), pair_scores(queries, docs, exact_ids))


def test_doubling_schedule_ends_at_the_cap():
    assert doubling(16, 100) == [16, 32, 64, 100]
    assert doubling(1, 51) == [1, 2, 4, 8, 16, 32, 51]
    assert doubling(1, 1) == [1]
    assert doubling(16, 64) == [16, 32, 64]


def test_hnsw_low_ef_search_misses_and_the_target_meets(corpus):
    queries, docs, exact_ids = corpus
    low = build_index("hnsw", docs, ef_search=16, **HNSW)
    assert full_recall(low, queries, docs, exact_ids) < 0.95

    index = build_index("hnsw", docs, **HNSW)
    tuning = tune_search(index, search_knob("hnsw", **HNSW), queries, docs, K, 0.95)
    assert tuning.met and tuning.param == "ef_search"
    assert tuning.value > 16 and index.hnsw.efSearch == tuning.value  # the index is left at the chosen value
    assert [v for v, _ in tuning.tried] == doubling(16, 4096)[: len(tuning.tried)]
    assert all(r < 0.95 for _, r in tuning.tried[:-1]) and tuning.tried[-1] == (tuning.value, tuning.recall)
    measured = full_recall(index, queries, docs, exact_ids)
    assert measured >= 0.95 and measured == pytest.approx(tuning.recall)


def test_ivf_nprobe_is_chosen_for_the_target(corpus):
    queries, docs, exact_ids = corpus
    low = build_index("ivfflat", docs, nprobe=1)
    assert full_recall(low, queries, docs, exact_ids) < 0.95

    index = build_index("ivfflat", docs)
    tuning = tune_search(index, search_knob("ivfflat"), queries, docs, K, 0.95)
    assert tuning.met and tuning.param == "nprobe" and 1 < tuning.value <= index.nlist
    assert index.nprobe == tuning.value
    assert [v for v, _ in tuning.tried] == doubling(1, index.nlist)[: len(tuning.tried)]
    assert full_recall(index, queries, docs, exact_ids) >= 0.95


def test_unreachable_target_keeps_the_best_and_warns(corpus, caplog):
    queries, docs, exact_ids = corpus
    # product quantisation with 8 codes per vector loses neighbours that no nprobe brings back
    index = build_index("ivfpq", docs, m=8)
    with caplog.at_level(logging.WARNING, logger="xmodal.tasks.retrieval.search"):
        tuning = tune_search(index, search_knob("ivfpq", m=8), queries, docs, K, 0.95)
    assert not tuning.met and tuning.recall < 0.95
    assert tuning.tried[-1][0] == index.nlist  # every list was probed before giving up
    assert tuning.recall == max(r for _, r in tuning.tried) and index.nprobe == tuning.value
    assert "NOT MET" in caplog.text and "0.95" in caplog.text
    assert full_recall(index, queries, docs, exact_ids) == pytest.approx(tuning.recall)


def pairs(num_images: int = 600, captions: int = 2):
    images = clustered(num_images, seed=3)
    g = torch.Generator().manual_seed(4)
    mapping = torch.arange(num_images * captions) // captions
    texts = torch.nn.functional.normalize(images[mapping] + 0.3 * torch.randn(len(mapping), 32, generator=g), dim=1)
    return images, texts, mapping


def test_evaluate_reports_chosen_setting_and_recall():
    images, texts, mapping = pairs()
    low = evaluate_retrieval(images, texts, mapping, index="hnsw", index_params={**HNSW, "ef_search": 16},
                             recall_sample=5000)
    tuned = evaluate_retrieval(images, texts, mapping, index="hnsw", index_params=HNSW, target_recall=0.95,
                               recall_sample=5000)
    assert low["image_to_text_index_recall@10"] < 0.95
    for d in ("image_to_text", "text_to_image"):
        assert tuned[f"{d}_index_recall@10"] >= 0.95  # measured on every query (the sample holds them all)
        assert tuned[f"{d}_index_target_met"] == 1.0 and tuned[f"{d}_index_target_recall"] == 0.95
        assert tuned[f"{d}_index_ef_search"] in doubling(16, 4096)
    assert tuned["image_to_text_index_ef_search"] > 16
    exact = evaluate_retrieval(images, texts, mapping)
    # with the top-10 nearly exact, recall@10 of the positives is close to exact search's (a 0.75 index is not)
    assert abs(tuned["image_to_text_R@10"] - exact["image_to_text_R@10"]) < 0.03
    table = markdown_table(tuned)
    assert "index ef_search" in table and "index recall@10" in table
    assert f"| {tuned['image_to_text_index_recall@10']:.4f} | {tuned['image_to_text_index_ef_search']} |" in table
    assert "target recall 0.95 of the exact top-k met" in table and "NOT MET" not in table


def test_evaluate_unreachable_target_is_in_results_and_table(caplog):
    images, texts, mapping = pairs()
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_retrieval(images, texts, mapping, index="hnsw",
                                     index_params={**HNSW, "max_ef_search": 16}, target_recall=0.999)
    assert metrics["image_to_text_index_target_met"] == 0.0
    assert metrics["image_to_text_index_ef_search"] == 16 and metrics["image_to_text_index_recall@10"] < 0.999
    assert "NOT MET" in caplog.text
    table = markdown_table(metrics)
    assert "NOT MET" in table and f"{metrics['image_to_text_index_recall@10']:.4f}" in table


def test_exact_search_ignores_a_target():
    images, texts, mapping = pairs(200)
    assert evaluate_retrieval(images, texts, mapping, target_recall=0.95) == evaluate_retrieval(images, texts, mapping)


@pytest.mark.parametrize("target", [0.0, 1.5, -0.1, "high"])
def test_bad_target_is_a_config_error(target):
    images, texts, mapping = pairs(50, 1)
    with pytest.raises(ConfigError, match="target_recall"):
        evaluate_retrieval(images, texts, mapping, index="hnsw", target_recall=target)


def test_target_and_explicit_setting_conflict():
    images, texts, mapping = pairs(50, 1)
    with pytest.raises(ConfigError, match="ef_search=64 and target_recall"):
        evaluate_retrieval(images, texts, mapping, index="hnsw", index_params={"ef_search": 64}, target_recall=0.9)


def test_sampled_tuning_is_seeded():
    images, texts, mapping = pairs()
    a = evaluate_retrieval(images, texts, mapping, index="ivfflat", target_recall=0.9, recall_sample=300, seed=5)
    b = evaluate_retrieval(images, texts, mapping, index="ivfflat", target_recall=0.9, recall_sample=300, seed=5)
    assert a == b and a["text_to_image_index_nprobe"] >= 1
    assert np.isfinite(a["text_to_image_index_recall@10"])


def test_cli_target_recall_reports_setting(tmp_path, capsys):
    import open_clip
    from test_retrieval_cli import TINY_CFG, run_cli, write_dataset

    model_dir = tmp_path / "tiny_clip"
    model_dir.mkdir()
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=open_clip.model.CLIPVisionCfg(**TINY_CFG["vision_cfg"]),
                                 text_cfg=open_clip.model.CLIPTextCfg(**TINY_CFG["text_cfg"]))
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), model_dir / "open_clip_pytorch_model.bin")
    data = write_dataset(tmp_path / "d")
    out = tmp_path / "r.json"
    assert run_cli("--model", str(model_dir), "--data", str(data), "--no-cache", "--index", "hnsw",
                   "--target-recall", "0.95", "--out", str(out), "--ks", "1", "3") == 0
    m = json.loads(out.read_text())["metrics"]
    for d in ("image_to_text", "text_to_image"):
        # a handful of vectors: the first efSearch already finds the exact top-3
        assert m[f"{d}_index_ef_search"] == 16 and m[f"{d}_index_target_met"] == 1.0
        assert m[f"{d}_index_recall@3"] == 1.0 and m[f"{d}_index_target_recall"] == 0.95
    printed = capsys.readouterr().out
    assert "image → text: target recall 0.95 of the exact top-k met: ef_search 16" in printed
    assert "index ef_search" in out.with_suffix(".md").read_text()
    assert run_cli("--model", str(model_dir), "--data", str(data), "--no-cache", "--index", "hnsw",
                   "--target-recall", "2") == 2
    assert "--target-recall" in capsys.readouterr().err


@pytest.mark.parametrize("target", [None, 0.9])
def test_non_finite_query_is_named_by_its_row(target):
    from xmodal.errors import DataError

    images, texts, mapping = pairs(200)
    images[137, 3] = float("nan")
    with pytest.raises(DataError, match="image embeddings row 137"):
        evaluate_retrieval(images, texts, mapping, index="hnsw", target_recall=target, recall_sample=150)

"""Search: exact blocked top-k against brute force, faiss indexes, approximate-vs-exact recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal.errors import ConfigError, DataError
from xmodal.tasks.retrieval import (
    INDEXES,
    build_index,
    evaluate_retrieval,
    exact_topk,
    index_recall,
    search_index,
)


def brute_topk(queries, docs, k, normalize=True):
    """Full matrix, sorted by (score desc, index asc) with a stable sort."""
    if normalize:
        queries = torch.nn.functional.normalize(queries, dim=1)
        docs = torch.nn.functional.normalize(docs, dim=1)
    scores = queries @ docs.T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order).numpy(), order.numpy()


@pytest.mark.parametrize("block_bytes", [4 * 1024 * 3, 4 * 1024 * 40, 128 * 2**20])
def test_exact_topk_matches_brute_force(block_bytes):
    g = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(70, 12, generator=g), torch.randn(300, 12, generator=g)
    scores, ids = exact_topk(queries, docs, 10, block_bytes=block_bytes)
    ref_s, ref_i = brute_topk(queries, docs, 10)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-6)


def test_exact_topk_breaks_ties_by_lower_index():
    g = torch.Generator().manual_seed(1)
    queries = torch.randint(-1, 2, (40, 3), generator=g).float()
    docs = torch.randint(-1, 2, (200, 3), generator=g).float()
    for block_bytes in (4 * 1024 * 7, 128 * 2**20):  # several document blocks, and one
        _, ids = exact_topk(queries, docs, 15, normalize=False, block_bytes=block_bytes)
        _, ref = brute_topk(queries, docs, 15, normalize=False)
        np.testing.assert_array_equal(ids, ref)


def test_exact_topk_k_larger_than_corpus():
    scores, ids = exact_topk(torch.randn(3, 4), torch.randn(5, 4), 10)
    assert ids.shape == (3, 5) and sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]


def test_flat_index_matches_exact():
    g = torch.Generator().manual_seed(2)
    queries, docs = torch.randn(50, 16, generator=g), torch.randn(400, 16, generator=g)
    index = build_index("flat", docs, block_rows=128)
    assert index.ntotal == 400
    _, ids = search_index(index, queries, 5, block_rows=16)
    _, ref = brute_topk(queries, docs, 5)
    np.testing.assert_array_equal(ids, ref)


@pytest.mark.parametrize("kind, params, floor", [("hnsw", {"m": 16}, 0.9), ("ivfpq", {"m": 8, "nprobe": 64}, 0.3)])
def test_approximate_indexes_report_recall_against_exact(kind, params, floor):
    g = torch.Generator().manual_seed(3)
    docs = torch.randn(2000, 32, generator=g)
    queries = docs[:200] + 0.3 * torch.randn(200, 32, generator=g)
    index = build_index(kind, docs, **params)
    _, approx = search_index(index, queries, 10)
    _, exact = exact_topk(queries, docs, 10)
    recall = index_recall(approx, exact)
    assert floor <= recall <= 1.0
    assert index_recall(exact, exact) == 1.0


def test_index_recall_counts_overlap():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert index_recall(approx, exact) == pytest.approx((2 + 4) / 8)


def test_evaluate_with_approximate_index():
    g = torch.Generator().manual_seed(4)
    images = torch.randn(300, 24, generator=g)
    mapping = torch.arange(1500) // 5
    texts = images[mapping] + 0.8 * torch.randn(1500, 24, generator=g)
    exact = evaluate_retrieval(images, texts, mapping)
    approx = evaluate_retrieval(images, texts, mapping, index="hnsw", recall_sample=100)
    for d in ("image_to_text", "text_to_image"):
        assert approx[f"{d}_index_recall@10"] >= 0.9
        for k in (1, 5, 10):
            assert approx[f"{d}_R@{k}"] <= exact[f"{d}_R@{k}"] + 1e-9  # missing neighbours can only cost hits
            assert approx[f"{d}_R@{k}"] == pytest.approx(exact[f"{d}_R@{k}"], abs=0.05)
    assert "image_to_text_median_rank" not in approx  # full ranks need exact search


def test_registry_and_errors():
    assert {"flat", "hnsw", "ivfpq"} <= set(INDEXES.names())
    with pytest.raises(ConfigError, match="did you mean 'hnsw'"):
        build_index("hnws", torch.randn(10, 4))
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_index("hnsw", torch.randn(10, 4), efsearch=3)
    index = build_index("flat", torch.randn(10, 4))
    with pytest.raises(DataError, match="dim 5"):
        search_index(index, torch.randn(2, 5), 3)
    with pytest.raises(DataError, match="queries have dim 3 but documents have dim 4"):
        exact_topk(torch.randn(2, 3), torch.randn(10, 4), 3)
    bad = torch.randn(10, 4)
    bad[6, 0] = float("inf")
    with pytest.raises(DataError, match="row 6"):
        build_index("flat", bad)


def test_approximate_index_follows_the_tie_rule_on_duplicates():
    """Duplicated images tie with the positive in the index's own scores: pessimistically they rank above it."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(500, 32, generator=g)
    images[400:] = images[:100]
    mapping = torch.arange(1000) % 500
    texts = images[mapping] + 0.05 * torch.randn(1000, 32, generator=g)
    duplicated = ((mapping < 100) | (mapping >= 400)).double().mean().item()
    for index in ("hnsw", "ivfpq"):
        params = {"m": 8, "nprobe": 64} if index == "ivfpq" else {}
        pess = evaluate_retrieval(images, texts, mapping, ks=(1, 2), index=index, index_params=params)
        opt = evaluate_retrieval(images, texts, mapping, ks=(1, 2), index=index, index_params=params,
                                 ties="optimistic")
        if index == "hnsw":  # exact enough on 500 well-separated images
            assert pess["text_to_image_R@1"] == pytest.approx(1 - duplicated)
            assert pess["text_to_image_R@2"] == 1.0 and opt["text_to_image_R@1"] == 1.0
        assert pess["text_to_image_R@1"] <= 1 - duplicated + 1e-9  # never credited for a tie, even approximate
        assert opt["text_to_image_R@1"] >= pess["text_to_image_R@1"]


def test_approximate_ranks_search_past_a_run_of_ties():
    """A run of equal scores that reaches the end of the results is searched further before ranking."""
    from xmodal.tasks.retrieval.evaluate import approximate_ranks

    g = torch.Generator().manual_seed(6)
    docs = torch.randn(200, 8, generator=g)
    docs[:12] = docs[0]  # 12 equal documents; the first 6 are the query's positives
    index = build_index("flat", docs)
    query = docs[:1] + 0.01 * torch.randn(1, 8, generator=g)

    def positives(q, ids):
        return ids < 6

    # 6 non-positives tie with the best positive: rank 7, though a first search of top + 1 = 11 saw only some
    assert approximate_ranks(index, query, positives, 10).tolist() == [7]
    assert approximate_ranks(index, query, positives, 10, ties="optimistic").tolist() == [1]
    assert approximate_ranks(index, query, positives, 5).tolist() == [6]  # beyond the top 5

    def one_positive(q, ids):
        return ids == 0

    assert approximate_ranks(index, query, one_positive, 30).tolist() == [12]


def test_index_recall_counts_a_duplicate_kept_instead_of_its_twin():
    from xmodal.tasks.retrieval.search import pair_scores

    g = torch.Generator().manual_seed(7)
    docs = torch.randn(100, 8, generator=g)
    docs[50] = docs[3]  # exact duplicates: the exact search keeps 3 (lower id), an index may return 50
    queries = torch.cat([docs[3:4], docs[10:11]]) + 0.01 * torch.randn(2, 8, generator=g)
    _, exact = exact_topk(queries, docs, 1)
    assert exact[:, 0].tolist() == [3, 10]
    approx = np.array([[50], [11]])  # the twin (as good), and a wrong neighbour
    scores = [pair_scores(queries, docs, i) for i in (approx, exact)]
    assert index_recall(approx, exact) == 0.0
    assert index_recall(approx, exact, *scores) == 0.5
    assert index_recall(np.array([[-1], [10]]), exact, pair_scores(queries, docs, np.array([[-1], [10]])),
                        scores[1]) == 0.5  # faiss's -1 padding is never a hit

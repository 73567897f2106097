"""Top-k search: an exact blocked search with a running top-k, and faiss indexes (flat, HNSW, IVF-PQ).

Indexes are built by name from `INDEXES`, so `--index hnsw` or a config picks one; approximate
indexes are judged by `index_recall`, the overlap of their top-k with the exact top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xmodal.errors import ConfigError, DataError
from xmodal.registry import Registry

from .metrics import DEFAULT_BLOCK_BYTES, check_embeddings, load_rows, prepare_rows

INDEXES: Registry[Callable[..., IndexFactory]] = Registry("retrieval index")


def _normalized_rows(x, start: int, stop: int, device: torch.device, normalize: bool, name: str) -> Tensor:
    return prepare_rows(load_rows(x, start, stop, device, name), normalize, name, start)


def _topk_lowest_index(scores: Tensor, k: int, offset: int) -> tuple[Tensor, Tensor]:
    """Top-k per row ordered by (score desc, index asc): ties at the cut go to the lowest index."""
    k = min(k, scores.shape[1])
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > kth
    equal = scores == kth
    need = k - above.sum(dim=1, keepdim=True)
    chosen = above | (equal & (torch.cumsum(equal, dim=1) <= need))
    idx = torch.nonzero(chosen)[:, 1].view(scores.shape[0], k)  # ascending column order per row
    vals = scores.gather(1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order) + offset


def exact_topk(
    queries,
    docs,
    k: int,
    *,
    normalize: bool = True,
    device: str | torch.device | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k documents per query by blocked matmul with a running top-k (memory linear in size).

    Returns (scores [Q, k] fp32, ids [Q, k] int64); ties are broken by the lower document index.
    """
    check_embeddings(queries, "queries")
    check_embeddings(docs, "documents")
    if queries.shape[1] != docs.shape[1]:
        raise DataError(f"queries have dim {queries.shape[1]} but documents have dim {docs.shape[1]}")
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    device = torch.device(device or (queries.device if isinstance(queries, Tensor) else "cpu"))
    num_q, num_d = int(queries.shape[0]), int(docs.shape[0])
    k = min(k, num_d)
    elems = max(1, block_bytes // 4)
    q_block = max(1, min(num_q, 1024))
    d_block = max(k, min(num_d, elems // q_block))
    out_s = np.empty((num_q, k), dtype=np.float32)
    out_i = np.empty((num_q, k), dtype=np.int64)
    doc_cache = None
    if num_d <= d_block:
        doc_cache = _normalized_rows(docs, 0, num_d, device, normalize, "documents")
    for q0 in range(0, num_q, q_block):
        q1 = min(q0 + q_block, num_q)
        q = _normalized_rows(queries, q0, q1, device, normalize, "queries")
        best_s = best_i = None
        for d0 in range(0, num_d, d_block):
            d1 = min(d0 + d_block, num_d)
            d = doc_cache if doc_cache is not None else _normalized_rows(docs, d0, d1, device, normalize, "documents")
            s, i = _topk_lowest_index(q @ d.T, k, d0)
            if best_s is None:
                best_s, best_i = s, i
            else:
                # earlier blocks hold lower ids, so a stable sort keeps the lower id first among ties
                cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
                best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
        out_s[q0:q1] = best_s.cpu().numpy()
        out_i[q0:q1] = best_i.cpu().numpy()
    return out_s, out_i


@dataclass
class IndexFactory:
    """How to build one faiss index over `dim`-wide vectors; `prepare` sets search-time knobs."""

    build: Callable[[int, int], object]  # (dim, num_vectors) -> faiss.Index
    needs_training: bool = False
    exact: bool = False


@INDEXES.register("flat")
def flat_index() -> IndexFactory:
    """Exact inner-product search (faiss IndexFlatIP)."""

    def build(dim: int, num: int):
        import faiss

        return faiss.IndexFlatIP(dim)

    return IndexFactory(build, exact=True)


@INDEXES.register("hnsw")
def hnsw_index(m: int = 32, ef_construction: int = 80, ef_search: int = 128) -> IndexFactory:
    """Graph index (HNSW, inner product): fast, high recall, no training; memory ≈ vectors + graph."""

    def build(dim: int, num: int):
        import faiss

        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        return index

    return IndexFactory(build)


def _pq_subquantizers(dim: int, wanted: int) -> int:
    """Largest divisor of `dim` not above `wanted` (product quantisation splits vectors evenly)."""
    return max(d for d in range(1, min(wanted, dim) + 1) if dim % d == 0)


@INDEXES.register("ivfpq")
def ivfpq_index(nlist: int | None = None, m: int = 64, nbits: int = 8, nprobe: int = 32) -> IndexFactory:
    """Inverted lists + product quantisation: compact codes for very large corpora; needs training."""

    def build(dim: int, num: int):
        import faiss

        lists = nlist or int(min(max(1, 4 * math.sqrt(num)), max(1, num // 39)))
        bits = nbits if num >= 39 * 2**nbits else max(1, int(math.log2(max(2, num // 39))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, lists, _pq_subquantizers(dim, m), bits, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, lists)  # faiss keeps a reference to the quantizer
        return index

    return IndexFactory(build, needs_training=True)


def build_index(
    kind: str,
    docs,
    *,
    normalize: bool = True,
    block_rows: int = 65536,
    train_size: int = 100_000,
    seed: int = 0,
    progress: bool = False,
    name: str = "documents",
    **params,
):
    """Build and fill the faiss index `kind` over `docs` (tensor or memory-mapped array), in blocks.

    `name` is how errors call the documents (e.g. "image embeddings").
    """
    factory = INDEXES.build(kind, **params)
    check_embeddings(docs, name)
    num, dim = int(docs.shape[0]), int(docs.shape[1])
    cpu = torch.device("cpu")
    index = factory.build(dim, num)
    if factory.needs_training:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(num, size=min(num, train_size), replace=False))
        rows = docs[torch.as_tensor(sample, device=docs.device)] if isinstance(docs, Tensor) else docs[sample]
        train = load_rows(rows, 0, len(sample), cpu, name, check=False)
        finite = torch.isfinite(train).all(dim=1)
        if not bool(finite.all()):  # name the row in `docs`, not in the sample
            bad = int(sample[int(torch.nonzero(~finite)[0, 0])])
            load_rows(docs, bad, bad + 1, cpu, name)  # raises, naming row `bad`
        train = _normalized_rows(train, 0, len(sample), cpu, normalize, name)
        index.train(np.ascontiguousarray(train.numpy()))
    starts = range(0, num, block_rows)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"indexing ({kind})", unit="block", leave=False)
    for start in starts:
        stop = min(start + block_rows, num)
        rows = _normalized_rows(docs, start, stop, cpu, normalize, name)
        index.add(np.ascontiguousarray(rows.numpy()))
    return index


def search_index(
    index, queries, k: int, *, normalize: bool = True, block_rows: int = 16384, progress: bool = False,
    name: str = "queries",
) -> tuple[np.ndarray, np.ndarray]:
    """Search `queries` in a faiss index block by block; returns (scores [Q, k], ids [Q, k])."""
    check_embeddings(queries, name)
    if queries.shape[1] != index.d:
        raise DataError(f"queries have dim {queries.shape[1]} but the index holds dim {index.d} vectors")
    num = int(queries.shape[0])
    k = min(k, int(index.ntotal))
    scores = np.empty((num, k), dtype=np.float32)
    ids = np.empty((num, k), dtype=np.int64)
    starts = range(0, num, block_rows)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="searching", unit="block", leave=False)
    for start in starts:
        stop = min(start + block_rows, num)
        q = _normalized_rows(queries, start, stop, torch.device("cpu"), normalize, name)
        scores[start:stop], ids[start:stop] = index.search(np.ascontiguousarray(q.numpy()), k)
    return scores, ids


def pair_scores(queries, docs, ids: np.ndarray, *, normalize: bool = True, block_rows: int = 256) -> np.ndarray:
    """Score of query i with each document `ids[i, j]` (NaN where the id is -1), all by one elementwise product.

    Every pair goes through the same computation, so equal documents (exact duplicates) get equal scores.
    """
    ids = np.asarray(ids)
    out = np.full(ids.shape, np.nan, dtype=np.float32)
    cpu = torch.device("cpu")
    for start in range(0, ids.shape[0], block_rows):
        stop = min(start + block_rows, ids.shape[0])
        q = _normalized_rows(queries, start, stop, cpu, normalize, "queries")
        block = ids[start:stop]
        rows = np.unique(block[block >= 0])
        d = _normalized_rows(docs[torch.as_tensor(rows, device=docs.device)] if isinstance(docs, Tensor)
                             else docs[rows], 0, len(rows), cpu, normalize, "documents")
        where = torch.as_tensor(np.searchsorted(rows, np.maximum(block, 0)))
        scores = (q[:, None, :] * d[where]).sum(dim=-1).numpy()
        out[start:stop] = np.where(block >= 0, scores, np.nan)
    return out


def index_recall(
    approx_ids: np.ndarray,
    exact_ids: np.ndarray,
    approx_scores: np.ndarray | None = None,
    exact_scores: np.ndarray | None = None,
) -> float:
    """k-recall@k: mean fraction of each query's exact top-k that the approximate index also returned.

    With scores (from `pair_scores`, one computation for both), an approximate result that scores at least
    the exact k-th score counts too: a tie at the cut, e.g. an exact duplicate of a top-k document, is as
    good a neighbour as the one the exact search happened to keep.
    """
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"{approx_ids.shape[0]} approximate vs {exact_ids.shape[0]} exact result rows")
    k = exact_ids.shape[1]
    if approx_scores is None or exact_scores is None:
        hits = sum(len(set(a[:k].tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids))
        return hits / float(exact_ids.size)
    kth = np.nanmin(np.asarray(exact_scores), axis=1, keepdims=True)
    good = (approx_ids[:, :k] >= 0) & (np.asarray(approx_scores)[:, :k] >= kth)  # NaN (no result) is not good
    return float(np.minimum(good.sum(axis=1), k).sum()) / float(exact_ids.size)

"""Top-k search: an exact blocked search with a running top-k, and faiss indexes (flat, HNSW, IVF, IVF-PQ).

Indexes are built by name from `INDEXES`, so `--index hnsw` or a config picks one; approximate
indexes are judged by `index_recall`, the overlap of their top-k with the exact top-k. An approximate
index names its speed/recall knob (`SearchKnob`: HNSW efSearch, IVF nprobe), and `tune_search` doubles
that knob until a requested recall of the exact top-k is met on a sample of queries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from xmodal.errors import ConfigError, DataError
from xmodal.registry import Registry

from .metrics import DEFAULT_BLOCK_BYTES, check_embeddings, load_rows, prepare_rows

INDEXES: Registry[Callable[..., IndexFactory]] = Registry("retrieval index")

log = logging.getLogger(__name__)


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


def doubling(start: int, cap: int) -> list[int]:
    """start, 2·start, 4·start, ... below `cap`, then `cap` itself: the values a recall target tries in turn."""
    values, v = [], max(1, start)
    while v < cap:
        values.append(v)
        v *= 2
    return [*values, max(1, cap)]


@dataclass(frozen=True)
class SearchKnob:
    """A search-time setting of a built index that trades speed for recall (HNSW efSearch, IVF nprobe)."""

    name: str  # the index parameter it stands for, e.g. "ef_search"
    apply: Callable[[object, int], None]  # set it on a built faiss index
    values: Callable[[object], list[int]]  # values a recall target tries, in order, for this built index


@dataclass
class IndexFactory:
    """How to build one faiss index over `dim`-wide vectors; `knob` is its search-time speed/recall setting."""

    build: Callable[[int, int], object]  # (dim, num_vectors) -> faiss.Index
    needs_training: bool = False
    exact: bool = False
    knob: SearchKnob | None = None


@INDEXES.register("flat")
def flat_index() -> IndexFactory:
    """Exact inner-product search (faiss IndexFlatIP)."""

    def build(dim: int, num: int):
        import faiss

        return faiss.IndexFlatIP(dim)

    return IndexFactory(build, exact=True)


def _set_ef_search(index, value: int) -> None:
    index.hnsw.efSearch = int(value)


def _set_nprobe(index, value: int) -> None:
    index.nprobe = int(value)


def _ivf_knob(start: int = 1) -> SearchKnob:
    """nprobe 1, 2, 4, ... up to every list (then only the codes' own error is left)."""
    return SearchKnob("nprobe", _set_nprobe, lambda index: doubling(start, int(index.nlist)))


def _ivf_lists(nlist: int | None, num: int) -> int:
    """faiss's rule of thumb (4·√N lists) with at least 39 training vectors per list."""
    return nlist or int(min(max(1, 4 * math.sqrt(num)), max(1, num // 39)))


@INDEXES.register("hnsw")
def hnsw_index(m: int = 32, ef_construction: int = 80, ef_search: int = 128, max_ef_search: int = 4096) -> IndexFactory:
    """Graph index (HNSW, inner product): fast, high recall, no training; memory ≈ vectors + graph.

    `max_ef_search` caps the efSearch a recall target may try (16, 32, ..., cap).
    """

    def build(dim: int, num: int):
        import faiss

        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        return index

    if max_ef_search < 1:
        raise ConfigError(f"hnsw index: max_ef_search must be at least 1, got {max_ef_search}")
    knob = SearchKnob("ef_search", _set_ef_search, lambda index: doubling(min(16, max_ef_search), max_ef_search))
    return IndexFactory(build, knob=knob)


@INDEXES.register("ivfflat")
def ivfflat_index(nlist: int | None = None, nprobe: int = 32) -> IndexFactory:
    """Inverted lists over full vectors: exact distances inside the probed lists; needs training (k-means)."""

    def build(dim: int, num: int):
        import faiss

        lists = _ivf_lists(nlist, num)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, lists)  # faiss keeps a reference to the quantizer
        return index

    return IndexFactory(build, needs_training=True, knob=_ivf_knob())


def _pq_subquantizers(dim: int, wanted: int) -> int:
    """Largest divisor of `dim` not above `wanted` (product quantisation splits vectors evenly)."""
    return max(d for d in range(1, min(wanted, dim) + 1) if dim % d == 0)


@INDEXES.register("ivfpq")
def ivfpq_index(nlist: int | None = None, m: int = 64, nbits: int = 8, nprobe: int = 32) -> IndexFactory:
    """Inverted lists + product quantisation: compact codes for very large corpora; needs training."""

    def build(dim: int, num: int):
        import faiss

        lists = _ivf_lists(nlist, num)
        bits = nbits if num >= 39 * 2**nbits else max(1, int(math.log2(max(2, num // 39))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, lists, _pq_subquantizers(dim, m), bits, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, lists)  # faiss keeps a reference to the quantizer
        return index

    return IndexFactory(build, needs_training=True, knob=_ivf_knob())


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
        from xmodal.progress import progress as progress_bar

        starts = progress_bar(starts, desc=f"indexing ({kind})", unit="block", leave=False)
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
        from xmodal.progress import progress as progress_bar

        starts = progress_bar(starts, desc="searching", unit="block", leave=False)
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


@dataclass
class Tuning:
    """What `tune_search` chose: the knob's value, the recall of the exact top-k it reached, and every try."""

    param: str  # the index parameter tuned, e.g. "ef_search"
    value: int  # the value chosen (the first that met the target; else the best tried)
    recall: float  # k-recall@k of the approximate top-k vs the exact top-k on the sample, at `value`
    target: float
    met: bool
    k: int
    queries: int  # how many queries the recall was measured on
    tried: list[tuple[int, float]] = field(default_factory=list)  # (value, recall) in the order tried

    def describe(self) -> str:
        """One line: the chosen value, the recall reached and whether the target was met."""
        verdict = "met" if self.met else f"NOT MET (best of {self.param} up to {self.tried[-1][0]})"
        return (f"{self.param}={self.value}: recall {self.recall:.4f} of the exact top-{self.k} on {self.queries:,} "
                f"queries, target {self.target:g} {verdict}")


def check_target_recall(target: float | None) -> None:
    """A recall target is a fraction in (0, 1]; anything else is a ConfigError naming the option."""
    if target is not None and not (isinstance(target, (int, float)) and 0.0 < float(target) <= 1.0):
        raise ConfigError(f"target_recall (--target-recall) must be a fraction in (0, 1], e.g. 0.95, got {target!r}")


def search_knob(kind: str, **params) -> SearchKnob | None:
    """The speed/recall knob of index `kind` (None for exact search)."""
    return INDEXES.build(kind, **params).knob


def tune_search(
    index,
    knob: SearchKnob,
    queries,
    docs,
    k: int,
    target: float,
    *,
    normalize: bool = True,
    exact: tuple[np.ndarray, np.ndarray] | None = None,
    device: str | torch.device | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Tuning:
    """Try the knob's values in turn (doubling) until the index's top-k holds `target` of the exact top-k.

    Recall is measured on `queries` (a sample) against exact search over `docs` (`exact` = its (scores, ids)
    when already computed), ties at the cut counted as hits (`index_recall` with scores). The index is left set
    to the chosen value. When no value meets the target, the best one is kept, `met` is False and a warning is
    logged: the caller reports the recall reached rather than a silently lower one.
    """
    check_target_recall(target)
    if exact is None:
        exact = exact_topk(queries, docs, k, normalize=normalize, device=device, block_bytes=block_bytes)
    exact_ids = exact[1]
    k = exact_ids.shape[1]
    exact_scores = pair_scores(queries, docs, exact_ids, normalize=normalize)  # one computation for both sides
    tried: list[tuple[int, float]] = []
    best = (-1.0, 0)
    for value in knob.values(index):
        knob.apply(index, value)
        _, ids = search_index(index, queries, k, normalize=normalize)
        recall = index_recall(ids, exact_ids, pair_scores(queries, docs, ids, normalize=normalize), exact_scores)
        tried.append((int(value), recall))
        if recall > best[0]:
            best = (recall, int(value))
        if recall >= target:
            break
    recall, value = best
    met = recall >= target
    knob.apply(index, value)
    tuning = Tuning(knob.name, value, recall, float(target), met, int(k), int(exact_ids.shape[0]), tried)
    if not met:
        log.warning("the index cannot reach the recall target: %s; tried %s. Raise the cap (e.g. --index-param "
                    "max_ef_search=...), build a finer index, or lower --target-recall", tuning.describe(),
                    ", ".join(f"{v}→{r:.3f}" for v, r in tried))
    return tuning

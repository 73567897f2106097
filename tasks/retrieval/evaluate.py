"""Image↔text retrieval metrics from two embedding matrices, plus CLIP_benchmark JSON and a markdown table.

Names are unambiguous: `image_to_text_R@k` means image queries retrieving captions, `text_to_image_R@k`
caption queries retrieving images. A query is a hit at k when any of its positives is in its top k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .metrics import (
    DEFAULT_BLOCK_BYTES,
    check_embeddings,
    check_ks,
    check_mapping,
    first_positive_ranks,
    rank_metrics,
)

DIRECTIONS = ("image_to_text", "text_to_image")
# CLIP_benchmark names the *retrieved* side: "image retrieval" = caption queries retrieving images.
CLIP_BENCHMARK_NAMES = {"text_to_image": "image_retrieval_recall@{k}", "image_to_text": "text_retrieval_recall@{k}"}
EXACT_INDEX = "flat"


def evaluate_retrieval(
    image_emb,
    text_emb,
    text_to_image,
    ks: Sequence[int] = (1, 5, 10),
    *,
    normalize: bool = True,
    ties: str = "pessimistic",
    index: str = EXACT_INDEX,
    index_params: dict[str, Any] | None = None,
    recall_sample: int = 1000,
    target_recall: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
) -> dict[str, float]:
    """Recall@k in both directions, and median / mean rank of the first positive (exact search).

    `image_emb` [I, D], `text_emb` [T, D] (tensors or memory-mapped arrays), `text_to_image[t]` = image of
    caption t. `index="flat"` is exact; "hnsw" / "ivfflat" / "ivfpq" search an approximate faiss index, report
    recall@k from its results (the same tie rule, on the index's own scores: see `approximate_ranks`), and add
    `{direction}_index_recall@K`: the overlap of its top-K with the exact top-K (K = max(ks)) on
    `recall_sample` seeded queries.

    `target_recall` (e.g. 0.95) chooses the index's search knob per direction before evaluating: HNSW
    efSearch 16, 32, ... up to `max_ef_search`, IVF nprobe 1, 2, 4, ... up to nlist, the first value whose
    index recall@K on the sample reaches the target (`search.tune_search`). Added per direction:
    `{direction}_index_{knob}` (the value used), `{direction}_index_target_recall` and
    `{direction}_index_target_met` (1.0 / 0.0). A target the cap cannot meet is not an error: the best value
    is used, a warning is logged, `target_met` is 0.0 and `markdown_table` says NOT MET with the recall reached.
    With exact search (`flat`) a target has nothing to tune (recall is 1) and is ignored.
    """
    from .search import check_target_recall

    ks = check_ks(ks)
    check_target_recall(target_recall)
    if index == EXACT_INDEX:
        ranks = first_positive_ranks(
            image_emb, text_emb, text_to_image, normalize=normalize, ties=ties, device=device,
            block_bytes=block_bytes, progress=progress,
        )
        metrics = rank_metrics(ranks.image_to_text, ks, "image_to_text")
        metrics.update(rank_metrics(ranks.text_to_image, ks, "text_to_image"))
        return metrics
    return _evaluate_approximate(
        image_emb, text_emb, text_to_image, ks, normalize=normalize, ties=ties, index=index,
        index_params=index_params or {}, recall_sample=recall_sample, target_recall=target_recall, seed=seed,
        device=device, block_bytes=block_bytes, progress=progress,
    )


def approximate_ranks(index, queries, is_positive, top: int, *, ties: str = "pessimistic", normalize: bool = True,
                      progress: bool = False, name: str = "queries") -> np.ndarray:
    """Rank of each query's first positive among a faiss index's results, capped at `top + 1` (beyond the top).

    The positive's score is the one the index returned for it, so it is compared with the other results'
    scores from the same computation: an exact duplicate of the positive ties with it, and the tie rule
    decides (pessimistic: counted above it). When a run of equal scores reaches the end of the results, the
    query is searched again with more results until the run ends. `is_positive(query_ids, ids)` → bool.
    """
    from xmodal.errors import ConfigError

    from .metrics import TIE_RULES
    from .search import search_index

    if ties not in TIE_RULES:
        raise ConfigError(f"ties must be one of {', '.join(TIE_RULES)}, got '{ties}'")
    num_q, total = int(queries.shape[0]), int(index.ntotal)
    ranks = np.full(num_q, top + 1, dtype=np.int64)
    todo = np.arange(num_q)
    k = min(top + 1, total)
    while todo.size:
        sub = queries if todo.size == num_q else _rows(queries, todo)
        scores, ids = search_index(index, sub, k, normalize=normalize, progress=progress, name=name)
        valid = ids >= 0  # faiss pads with -1 when it finds fewer than k
        hit = valid & is_positive(todo, np.where(valid, ids, 0))
        found = hit.any(axis=1)
        first = scores[np.arange(len(todo)), hit.argmax(axis=1)][:, None]
        above = valid & ~hit & ((scores >= first) if ties == "pessimistic" else (scores > first))
        rank = np.where(found, 1 + above.sum(axis=1), top + 1)
        ranks[todo] = np.minimum(rank, top + 1)
        # equal scores up to the last result: more may follow, and pessimistically they rank above
        open_run = found & valid[:, -1] & (scores[:, -1] >= first[:, 0]) & (rank <= top)
        if ties != "pessimistic" or k >= total or not open_run.any():
            break
        todo, k = todo[open_run], min(2 * k, total)
    return ranks


def _rows(x, idx: np.ndarray):
    """Rows `idx` (sorted) of a tensor or (memory-mapped) array."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx, device=x.device)]
    return np.asarray(x[idx])


def _check_finite(x, name: str, block_rows: int = 65536) -> None:
    """DataError naming `name` and the first row with NaN or infinite values (one blocked pass)."""
    from .metrics import load_rows

    for start in range(0, int(x.shape[0]), block_rows):
        load_rows(x, start, min(start + block_rows, int(x.shape[0])), torch.device("cpu"), name)


def _evaluate_approximate(
    image_emb, text_emb, text_to_image, ks, *, normalize, ties, index, index_params, recall_sample, target_recall,
    seed, device, block_bytes, progress,
) -> dict[str, float]:
    from xmodal.errors import ConfigError, DataError

    from .search import build_index, exact_topk, index_recall, pair_scores, search_index, search_knob, tune_search

    check_embeddings(image_emb, "image embeddings")
    check_embeddings(text_emb, "text embeddings")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise DataError(
            f"image embeddings have dim {image_emb.shape[1]} but text embeddings have dim {text_emb.shape[1]}"
        )
    knob = None
    if target_recall is not None:
        knob = search_knob(index, **index_params)
        if knob is None:
            raise ConfigError(f"index '{index}' has no search setting to tune for target_recall (--target-recall)")
        if knob.name in index_params:
            raise ConfigError(
                f"index param {knob.name}={index_params[knob.name]} and target_recall={target_recall} both set "
                f"{knob.name}: give one (the target chooses {knob.name}; max_ef_search caps HNSW's search)"
            )
    num_images, num_texts = int(image_emb.shape[0]), int(text_emb.shape[0])
    mapping = check_mapping(text_to_image, num_images, num_texts).numpy()
    top = max(ks)
    metrics: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    sides = (("image_to_text", image_emb, text_emb, "image", "text"),
             ("text_to_image", text_emb, image_emb, "text", "image"))
    for direction, queries, docs, q_name, d_name in sides:
        q_name, d_name = f"{q_name} embeddings", f"{d_name} embeddings"
        idx = build_index(index, docs, normalize=normalize, progress=progress, seed=seed, name=d_name, **index_params)
        _check_finite(queries, q_name)  # before the sample: an error names the row in `queries`, not in the sample
        n_q = int(queries.shape[0])
        sample = np.sort(rng.choice(n_q, size=min(n_q, recall_sample), replace=False))
        sample_q = _rows(queries, sample)
        exact = exact_topk(sample_q, docs, top, normalize=normalize, device=device, block_bytes=block_bytes)
        k_recall = exact[1].shape[1]
        judged: dict[str, float] = {}
        if knob is not None:  # choose the knob first: the ranks below use the chosen value
            tuning = tune_search(idx, knob, sample_q, docs, top, target_recall, normalize=normalize, exact=exact)
            judged[f"{direction}_index_recall@{k_recall}"] = tuning.recall
            judged[f"{direction}_index_{tuning.param}"] = tuning.value
            judged[f"{direction}_index_target_recall"] = tuning.target
            judged[f"{direction}_index_target_met"] = 1.0 if tuning.met else 0.0
        else:
            _, ids = search_index(idx, sample_q, top, normalize=normalize)
            scores = [pair_scores(sample_q, docs, i, normalize=normalize) for i in (ids, exact[1])]
            judged[f"{direction}_index_recall@{k_recall}"] = index_recall(ids, exact[1], *scores)
        if direction == "image_to_text":
            def is_positive(q, ids):
                return mapping[ids] == q[:, None]
        else:
            def is_positive(q, ids):
                return ids == mapping[q][:, None]
        first = approximate_ranks(idx, queries, is_positive, top, ties=ties, normalize=normalize, progress=progress,
                                  name=q_name)
        metrics.update({f"{direction}_R@{k}": float(np.mean(first <= k)) for k in ks})
        metrics.update(judged)
    return metrics


def clip_benchmark_names(metrics: dict[str, float]) -> dict[str, float]:
    """CLIP_benchmark's keys for the recall values (`image_retrieval_recall@k`, `text_retrieval_recall@k`)."""
    out = {}
    for direction, template in CLIP_BENCHMARK_NAMES.items():
        prefix = f"{direction}_R@"
        for name, value in metrics.items():
            if name.startswith(prefix):
                out[template.format(k=name[len(prefix):])] = value
    return out


def clip_benchmark_result(
    metrics: dict[str, float],
    *,
    dataset: str,
    model: str,
    pretrained: str | None,
    language: str = "en",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object CLIP_benchmark writes for zero-shot retrieval, with our unambiguous names added.

    `model` and `pretrained` are always strings (no pretrained tag: ""), since CLIP_benchmark's `build`
    step concatenates them into `model_fullname`.
    """
    out = {
        "dataset": str(dataset),
        "model": str(model),
        "pretrained": "" if pretrained is None else str(pretrained),
        "task": "zeroshot_retrieval",
        "metrics": {**clip_benchmark_names(metrics), **metrics},
        "language": language,
    }
    if extra:
        out.update(extra)
    return out


_TARGET_KEYS = ("target_recall", "target_met")


def _index_cell(value) -> str:
    """A knob value as an integer, a recall with four decimals, a missing one as nan."""
    if value is None:
        return "nan"
    return str(int(value)) if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"


def target_note(metrics: dict[str, Any]) -> str:
    """One line per direction with a recall target: met or NOT MET, the knob value and the recall reached."""
    lines = []
    for direction in DIRECTIONS:
        target = metrics.get(f"{direction}_index_target_recall")
        if target is None:
            continue
        prefix = f"{direction}_index_"
        recall = next(((n[len(prefix):], v) for n, v in metrics.items() if n.startswith(prefix + "recall@")), None)
        names = [n[len(prefix):] for n in metrics if n.startswith(prefix)]
        knobs = [f"{c} {_index_cell(metrics[prefix + c])}" for c in names
                 if not c.startswith("recall@") and c not in _TARGET_KEYS]
        met = bool(metrics.get(f"{direction}_index_target_met"))
        reached = f"{recall[0]} {recall[1]:.4f}" if recall else "recall unknown"
        verdict = "met" if met else "NOT MET (the search cap was reached; recall@k above is from an index below target)"
        lines.append(f"- {direction.replace('_to_', ' → ')}: target recall {target:g} of the exact top-k {verdict}: "
                     f"{', '.join(knobs)}, index {reached}")
    return "\n".join(lines)


def markdown_table(metrics: dict[str, float]) -> str:
    """A two-row table (image → text, text → image): R@k in percent, median and mean rank when known, and for an
    approximate index its recall of the exact top-k and the search setting used (with a line on any target)."""
    ks = sorted({int(n.split("@", 1)[1]) for n in metrics if "_R@" in n})
    has_ranks = any(n.endswith("_median_rank") for n in metrics)
    index_cols = sorted({n.split("_index_", 1)[1] for n in metrics if "_index_" in n} - set(_TARGET_KEYS),
                        key=lambda c: (not c.startswith("recall@"), c))
    head = ["direction", *(f"R@{k}" for k in ks)]
    if has_ranks:
        head += ["median rank", "mean rank"]
    head += [f"index {c}" for c in index_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for direction in DIRECTIONS:
        row = [direction.replace("_to_", " → ")]
        row += [f"{100 * metrics[f'{direction}_R@{k}']:.2f}" for k in ks]
        if has_ranks:
            row += [f"{metrics[f'{direction}_median_rank']:g}", f"{metrics[f'{direction}_mean_rank']:.2f}"]
        row += [f"{metrics.get(f'{direction}_index_{c}', float('nan')):.4f}" if c.startswith("recall@")
                else _index_cell(metrics.get(f"{direction}_index_{c}")) for c in index_cols]
        lines.append("| " + " | ".join(row) + " |")
    note = target_note(metrics)
    return ("\n".join(lines) + "\n\nR@k in percent; ranks are 1-based ranks of the first positive."
            + (" index recall@k: the share of the exact top-k the index returned (sampled queries)." if index_cols
               else "") + "\n" + (f"\n{note}\n" if note else ""))

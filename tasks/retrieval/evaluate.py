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
    seed: int = 0,
    device: str | torch.device | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
) -> dict[str, float]:
    """Recall@k in both directions, and median / mean rank of the first positive (exact search).

    `image_emb` [I, D], `text_emb` [T, D] (tensors or memory-mapped arrays), `text_to_image[t]` = image of
    caption t. `index="flat"` is exact with a deterministic tie rule (see `metrics`); "hnsw" / "ivfpq"
    search an approximate faiss index, report recall@k from its top-k, and add
    `{direction}_index_recall@K`: the overlap of its top-K with the exact top-K on `recall_sample` queries.
    """
    ks = check_ks(ks)
    if index == EXACT_INDEX:
        ranks = first_positive_ranks(
            image_emb, text_emb, text_to_image, normalize=normalize, ties=ties, device=device,
            block_bytes=block_bytes, progress=progress,
        )
        metrics = rank_metrics(ranks.image_to_text, ks, "image_to_text")
        metrics.update(rank_metrics(ranks.text_to_image, ks, "text_to_image"))
        return metrics
    return _evaluate_approximate(
        image_emb, text_emb, text_to_image, ks, normalize=normalize, index=index, index_params=index_params or {},
        recall_sample=recall_sample, seed=seed, device=device, block_bytes=block_bytes, progress=progress,
    )


def _evaluate_approximate(
    image_emb, text_emb, text_to_image, ks, *, normalize, index, index_params, recall_sample, seed, device,
    block_bytes, progress,
) -> dict[str, float]:
    from xmodal.errors import DataError

    from .search import build_index, exact_topk, index_recall, search_index

    check_embeddings(image_emb, "image embeddings")
    check_embeddings(text_emb, "text embeddings")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise DataError(
            f"image embeddings have dim {image_emb.shape[1]} but text embeddings have dim {text_emb.shape[1]}"
        )
    num_images, num_texts = int(image_emb.shape[0]), int(text_emb.shape[0])
    mapping = check_mapping(text_to_image, num_images, num_texts).numpy()
    top = max(ks)
    metrics: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    for direction, queries, docs in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb)):
        idx = build_index(index, docs, normalize=normalize, progress=progress, seed=seed, **index_params)
        _, ids = search_index(idx, queries, top, normalize=normalize, progress=progress)
        if direction == "image_to_text":
            hit = mapping[ids] == np.arange(num_images)[:, None]
        else:
            hit = ids == mapping[:, None]
        hit &= ids >= 0  # faiss pads with -1 when it finds fewer than k
        first = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, top + 1)
        metrics.update({f"{direction}_R@{k}": float(np.mean(first <= k)) for k in ks})
        n_q = int(queries.shape[0])
        sample = np.sort(rng.choice(n_q, size=min(n_q, recall_sample), replace=False))
        if isinstance(queries, torch.Tensor):
            sample_q = queries[torch.as_tensor(sample, device=queries.device)]
        else:
            sample_q = np.asarray(queries[sample])
        _, exact_ids = exact_topk(sample_q, docs, top, normalize=normalize, device=device, block_bytes=block_bytes)
        metrics[f"{direction}_index_recall@{exact_ids.shape[1]}"] = index_recall(ids[sample], exact_ids)
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
    """The JSON object CLIP_benchmark writes for zero-shot retrieval, with our unambiguous names added."""
    out = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": "zeroshot_retrieval",
        "metrics": {**clip_benchmark_names(metrics), **metrics},
        "language": language,
    }
    if extra:
        out.update(extra)
    return out


def markdown_table(metrics: dict[str, float]) -> str:
    """A two-row table (image → text, text → image): R@k in percent, median and mean rank when known."""
    ks = sorted({int(n.split("@", 1)[1]) for n in metrics if "_R@" in n})
    has_ranks = any(n.endswith("_median_rank") for n in metrics)
    index_cols = sorted({n.split("_index_", 1)[1] for n in metrics if "_index_recall@" in n})
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
        row += [f"{metrics.get(f'{direction}_index_{c}', float('nan')):.4f}" for c in index_cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\nR@k in percent; ranks are 1-based ranks of the first positive.\n"

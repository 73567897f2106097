"""Exact image↔text retrieval ranks in one blocked pass: memory linear in the number of items.

For every query we need the rank of its first positive. Instead of sorting a full queries × documents
matrix, the rank is counted directly: rank = 1 + (number of non-positive documents that score at
least as high as the query's best positive). One pass over text blocks × all images gives both
directions at once: row counts are text→image ranks, column counts (summed over blocks) are
image→text ranks. Counting uses matrix-vector products over 0/1 masks, so the pass costs about
one dense matrix product plus two elementwise sweeps.

Tie rule (deterministic, independent of data order): with `ties="pessimistic"` (default) a
non-positive document with exactly the positive's score is counted as ranked above it, so a
model that scores everything equally gets R@1 = 0 rather than a lucky 1. `ties="optimistic"`
counts only strictly higher scores. The score of each positive pair is computed once and written
into the score block, so a positive is compared with itself bit-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xmodal.errors import ConfigError, DataError

TIE_RULES = ("pessimistic", "optimistic")
DEFAULT_BLOCK_BYTES = 128 * 2**20  # one fp32 score block; a mask buffer of the same size sits beside it
_EXACT_FP32_COUNT = 2**24  # 0/1 sums in fp32 are exact below this


@dataclass
class Ranks:
    """1-based rank of the first positive for every image query and every text query."""

    image_to_text: np.ndarray  # [num_images] int64
    text_to_image: np.ndarray  # [num_texts] int64


def _num_rows(x) -> int:
    return int(x.shape[0])


def check_embeddings(x, name: str) -> None:
    """A 2-D, non-empty embedding matrix, else a DataError naming `name` and its shape."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise DataError(f"{name} must be a 2-D [items, dim] matrix, got shape {list(shape)}")
    if shape[0] == 0:
        raise DataError(f"{name} is empty (shape {list(shape)}): the data set has no items to evaluate")
    if shape[1] == 0:
        raise DataError(f"{name} has zero width (shape {list(shape)})")


def load_rows(x, start: int, stop: int, device: torch.device, name: str = "embeddings", check: bool = True) -> Tensor:
    """Rows [start, stop) of a tensor or (memory-mapped) array as fp32 on `device`; non-finite → DataError."""
    if isinstance(x, Tensor):
        block = x[start:stop].to(device=device, dtype=torch.float32)
    else:
        block = torch.from_numpy(np.ascontiguousarray(x[start:stop], dtype=np.float32)).to(device)
    if not check:
        return block
    finite = torch.isfinite(block).all(dim=1)
    if not bool(finite.all()):
        bad = int(torch.nonzero(~finite)[0, 0]) + start
        raise DataError(
            f"{name} row {bad} contains NaN or infinite values; re-encode that item "
            "(e.g. fp16 overflow or a corrupt input) or drop it from the data set"
        )
    return block


def check_mapping(text_to_image, num_images: int, num_texts: int) -> Tensor:
    """Validate the caption → image index array (one image per caption, every image captioned)."""
    mapping = torch.as_tensor(np.asarray(text_to_image) if not isinstance(text_to_image, Tensor) else text_to_image)
    if mapping.dim() != 1 or mapping.shape[0] != num_texts:
        raise DataError(
            f"text_to_image must have one image index per caption: expected shape [{num_texts}], "
            f"got {list(mapping.shape)}"
        )
    if mapping.dtype.is_floating_point or mapping.dtype == torch.bool:
        raise DataError(f"text_to_image must hold integer image indices, got dtype {mapping.dtype}")
    mapping = mapping.to(torch.int64).cpu()
    bad = torch.nonzero((mapping < 0) | (mapping >= num_images))
    if bad.numel():
        i = int(bad[0, 0])
        raise DataError(
            f"caption {i} points to image {int(mapping[i])}, but there are only {num_images} images "
            f"(valid indices 0..{num_images - 1})"
        )
    counts = torch.bincount(mapping, minlength=num_images)
    orphans = torch.nonzero(counts == 0).flatten()
    if orphans.numel():
        few = ", ".join(str(int(i)) for i in orphans[:5])
        raise DataError(
            f"{orphans.numel()} image(s) have no caption (first: {few}); every image needs at least one "
            "caption to be an image→text query — drop them or add captions"
        )
    return mapping


def _block_shape(num_rows: int, num_cols: int, block_bytes: int) -> tuple[int, int]:
    """Rows × columns of one fp32 score tile within the byte budget (both < 2**24 so fp32 counts stay exact)."""
    elems = max(1, block_bytes // 4)
    if num_cols * 256 <= elems:
        cols = num_cols
        rows = elems // num_cols
    else:
        rows = 256
        cols = max(1, elems // rows)
    return min(rows, num_rows, _EXACT_FP32_COUNT - 1), min(cols, num_cols, _EXACT_FP32_COUNT - 1)


def first_positive_ranks(
    image_emb,
    text_emb,
    text_to_image,
    *,
    normalize: bool = True,
    ties: str = "pessimistic",
    device: str | torch.device | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
) -> Ranks:
    """Exact ranks of the first positive in both directions; never holds the full score matrix.

    `image_emb` [I, D] and `text_emb` [T, D] may be tensors or (memory-mapped, fp16) arrays;
    `text_to_image[t]` is the image of caption t. Scores are dot products (cosine when `normalize`).
    """
    if ties not in TIE_RULES:
        raise ConfigError(f"ties must be one of {', '.join(TIE_RULES)}, got '{ties}'")
    check_embeddings(image_emb, "image embeddings")
    check_embeddings(text_emb, "text embeddings")
    num_images, dim = image_emb.shape
    num_texts, text_dim = text_emb.shape
    if dim != text_dim:
        raise DataError(
            f"image embeddings have dim {dim} but text embeddings have dim {text_dim}; both sides must come "
            "from the same model (or be projected into the same space)"
        )
    mapping = check_mapping(text_to_image, num_images, num_texts)
    if device is None:
        device = image_emb.device if isinstance(image_emb, Tensor) else torch.device("cpu")
    device = torch.device(device)
    mapping_dev = mapping.to(device)

    images = load_rows(image_emb, 0, num_images, device, "image embeddings")
    if normalize:
        images = torch.nn.functional.normalize(images, dim=1)
    rows_per_block, cols_per_block = _block_shape(num_texts, num_images, block_bytes)

    def text_block(start: int, stop: int, check: bool = True) -> Tensor:
        block = load_rows(text_emb, start, stop, device, "text embeddings", check)
        return torch.nn.functional.normalize(block, dim=1) if normalize else block

    # Pass 1 (O(T·D)): the score of every positive pair, once; the best positive of every image.
    pos = torch.empty(num_texts, dtype=torch.float32, device=device)
    for start in range(0, num_texts, rows_per_block):
        stop = min(start + rows_per_block, num_texts)
        pos[start:stop] = (text_block(start, stop) * images[mapping_dev[start:stop]]).sum(dim=1)
    best = torch.full((num_images,), -torch.inf, device=device).scatter_reduce(0, mapping_dev, pos, "amax")
    # positives that reach their image's best score are counted by the sweep; subtract them again
    best_hits = torch.bincount(mapping_dev[pos == best[mapping_dev]], minlength=num_images)

    compare = torch.ge if ties == "pessimistic" else torch.gt
    text_counts = torch.zeros(num_texts, dtype=torch.int64, device=device)
    image_counts = torch.zeros(num_images, dtype=torch.int64, device=device)
    scores = torch.empty(rows_per_block, cols_per_block, device=device)
    mask = torch.empty_like(scores)
    ones_cols = torch.ones(cols_per_block, device=device)
    ones_rows = torch.ones(rows_per_block, device=device)

    starts = range(0, num_texts, rows_per_block)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="ranking", unit="block", leave=False)
    # Pass 2: one matmul per tile; row sweeps give text→image counts, column sweeps image→text counts.
    for start in starts:
        stop = min(start + rows_per_block, num_texts)
        rows = stop - start
        texts = text_block(start, stop, check=False)  # checked in pass 1
        row_idx = torch.arange(rows, device=device)
        row_pos, row_img = pos[start:stop], mapping_dev[start:stop]
        for c0 in range(0, num_images, cols_per_block):
            c1 = min(c0 + cols_per_block, num_images)
            cols = c1 - c0
            s = scores[:rows, :cols]
            torch.matmul(texts, images[c0:c1].T, out=s)
            inside = (row_img >= c0) & (row_img < c1)
            s[row_idx[inside], row_img[inside] - c0] = row_pos[inside]
            m = mask[:rows, :cols]
            compare(s, row_pos[:, None], out=m)
            text_counts[start:stop] += torch.mv(m, ones_cols[:cols]).to(torch.int64)
            compare(s, best[None, c0:c1], out=m)
            image_counts[c0:c1] += torch.mv(m.T, ones_rows[:rows]).to(torch.int64)

    if ties == "pessimistic":
        # every count includes the positive itself (its score equals the threshold bit-exactly)
        text_ranks = text_counts
        image_ranks = 1 + image_counts - best_hits
    else:
        text_ranks = 1 + text_counts
        image_ranks = 1 + image_counts
    return Ranks(image_to_text=image_ranks.cpu().numpy(), text_to_image=text_ranks.cpu().numpy())


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose first positive is within the top k."""
    return float(np.mean(np.asarray(ranks) <= k))


def rank_metrics(ranks: np.ndarray, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """`{prefix}_R@k` for every k, plus `{prefix}_median_rank` and `{prefix}_mean_rank` (1-based)."""
    ranks = np.asarray(ranks)
    out = {f"{prefix}_R@{k}": recall_at_k(ranks, k) for k in ks}
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    return out


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"recall cut-offs must be positive integers, got {list(ks)}")
    return tuple(sorted(set(ks)))

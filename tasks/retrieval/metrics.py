"""Exact image↔text retrieval ranks in one blocked pass: memory linear in the number of items.

For every query we need the rank of its first positive. Instead of sorting a full queries × documents
matrix, the rank is counted directly: rank = 1 + (number of non-positive documents that score at
least as high as the query's best positive). One pass over text blocks × image tiles gives both
directions at once: row counts are text→image ranks, column counts (summed over blocks) are
image→text ranks. Counting uses matrix-vector products over 0/1 masks, so the pass costs about
one dense matrix product plus a few elementwise sweeps.

Tie rule (deterministic, independent of data order): with `ties="pessimistic"` (default) a
non-positive document with exactly the positive's score is counted as ranked above it, so a
model that scores everything equally, or an exact duplicate of the positive image or caption,
gets no credit (rank ≥ 2) rather than a lucky rank 1. `ties="optimistic"` counts only strictly
higher scores.

Every score, the positive's included, is read from the same tiled matrix product (tiles of one
shape, zero-padded), so an exact duplicate scores bit-exactly like the positive. A positive's
score is only known once its tile is computed, so each threshold starts as an elementwise
estimate with a rounding-error bound: documents above the bound are counted at once, the few
inside it are kept and settled against the exact score at the end (a second pass runs only if
too many fall inside, e.g. a model that scores everything equally).
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


_ROUNDING_ULPS = 32  # GEMM vs elementwise dot products differ by a few units of u·Σ|a·b|; verified, not assumed
_BAND_CAP = 2**22  # near-threshold scores kept per direction before falling back to a second pass
_FP32_MAX_PRODUCT = 1e38  # |a·b| ≤ ‖a‖‖b‖ below this cannot overflow fp32


def prepare_rows(block: Tensor, normalize: bool, name: str, start: int) -> Tensor:
    """L2-normalised rows (when asked); a row whose norm overflows fp32 is a DataError, not a zero vector."""
    if not normalize:
        return block
    norms = torch.linalg.vector_norm(block, dim=1)
    if not bool(torch.isfinite(norms).all()):
        bad = int(torch.nonzero(~torch.isfinite(norms))[0, 0]) + start
        raise DataError(f"{name} row {bad} has a norm that overflows fp32; the model's output is broken or unscaled")
    return block / norms.clamp_min(1e-12)[:, None]


class _Band:
    """Rank counts for one direction whose thresholds (best positive scores) are only estimates during the pass.

    Scores above `hi` are counted at once, scores below `lo` never; the few inside [lo, hi] are kept as
    (query, score) and compared with the exact threshold once the pass has read it from the product.
    """

    def __init__(self, lo: Tensor, hi: Tensor):
        self.lo, self.hi = lo, hi
        self.above = torch.zeros(lo.shape[0], dtype=torch.int64, device=lo.device)
        self.queries: list[Tensor] = []
        self.scores: list[Tensor] = []
        self.kept = 0
        self.overflow = False

    @staticmethod
    def count(s: Tensor, mask: Tensor, lo: Tensor, hi: Tensor, ones: Tensor, axis: int) -> tuple[Tensor, Tensor]:
        """Per query of this tile (rows: axis 1, columns: axis 0): how many scores lie in [lo, hi], how many above."""
        reduce = (lambda m: torch.mv(m, ones)) if axis == 1 else (lambda m: torch.mv(m.T, ones))
        torch.ge(s, lo, out=mask)
        at_least_lo = reduce(mask)
        torch.gt(s, hi, out=mask)
        above = reduce(mask)
        return (at_least_lo - above).to(torch.int64), above.to(torch.int64)

    def keep(self, queries: Tensor, scores: Tensor) -> None:
        self.kept += int(queries.numel())
        if self.kept > _BAND_CAP:
            self.overflow = True  # finish() will ask for a second pass; stop holding memory
            self.queries.clear()
            self.scores.clear()
        elif not self.overflow:
            self.queries.append(queries)
            self.scores.append(scores)

    def finish(self, exact: Tensor, compare) -> Tensor | None:
        """Non-positives ranked above each query's positive, or None when a second pass must count them."""
        if self.overflow or not bool(((exact >= self.lo) & (exact <= self.hi)).all()):
            return None
        counts = self.above.clone()
        if self.queries:
            q, v = torch.cat(self.queries), torch.cat(self.scores)
            counts.index_add_(0, q, compare(v, exact[q]).to(torch.int64))
        return counts


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
    rows_per_block, cols_per_block = _block_shape(num_texts, num_images, block_bytes)
    num_tiles = -(-num_images // cols_per_block)

    # Images zero-padded to whole tiles, and one text buffer: every product below has the same shape and
    # memory layout, so equal vectors get bit-equal scores wherever they sit.
    images = torch.zeros(num_tiles * cols_per_block, dim, device=device)
    for start in range(0, num_images, rows_per_block):
        stop = min(start + rows_per_block, num_images)
        images[start:stop] = prepare_rows(load_rows(image_emb, start, stop, device, "image embeddings"), normalize,
                                       "image embeddings", start)
    text_buf = torch.zeros(rows_per_block, dim, device=device)

    def load_texts(start: int, stop: int, check: bool = True) -> Tensor:
        text_buf[: stop - start] = prepare_rows(load_rows(text_emb, start, stop, device, "text embeddings", check),
                                             normalize, "text embeddings", start)
        text_buf[stop - start :] = 0
        return text_buf

    # Pass 1 (O(T·D)): every positive score estimated elementwise, with a bound on its rounding error.
    est = torch.empty(num_texts, device=device)
    err = torch.empty(num_texts, device=device)
    max_text_norm = 0.0
    for start in range(0, num_texts, rows_per_block):
        stop = min(start + rows_per_block, num_texts)
        texts = load_texts(start, stop)[: stop - start]
        prod = texts * images[mapping_dev[start:stop]]
        est[start:stop] = prod.sum(dim=1)
        err[start:stop] = prod.abs().sum(dim=1) * (_ROUNDING_ULPS * 2.0**-24)
        if not normalize:
            max_text_norm = max(max_text_norm, float(torch.linalg.vector_norm(texts, dim=1).max()))
    if not normalize:
        max_image_norm = float(torch.linalg.vector_norm(images, dim=1).max())
        if max_image_norm * max_text_norm >= _FP32_MAX_PRODUCT:
            raise DataError(
                f"scores would overflow fp32 (largest image norm {max_image_norm:.3g}, largest text norm "
                f"{max_text_norm:.3g}); evaluate with normalize=True or scale the embeddings down"
            )

    compare = torch.ge if ties == "pessimistic" else torch.gt
    best_est = torch.full((num_images,), -torch.inf, device=device).scatter_reduce(0, mapping_dev, est, "amax")
    best_err = torch.zeros(num_images, device=device).scatter_reduce(0, mapping_dev, err, "amax")
    image_band = _Band(best_est - best_err, best_est + best_err)
    # with one image tile a caption's positive is in every tile it meets: its threshold is exact at once
    text_band = None if num_tiles == 1 else _Band(est - err, est + err)
    text_counts = torch.zeros(num_texts, dtype=torch.int64, device=device)  # (one tile) positive included
    exact = torch.empty(num_texts, device=device)
    scores = torch.empty(rows_per_block, cols_per_block, device=device)
    mask = torch.empty_like(scores)
    ones_cols = torch.ones(cols_per_block, device=device)
    ones_rows = torch.ones(rows_per_block, device=device)

    def row_blocks(desc: str):
        starts = range(0, num_texts, rows_per_block)
        if progress:
            from xmodal.progress import progress as progress_bar

            starts = progress_bar(starts, desc=desc, unit="block", leave=False)
        for start in starts:
            yield start, min(start + rows_per_block, num_texts)

    # Pass 2: one product per tile; row sweeps count text→image, column sweeps image→text.
    for start, stop in row_blocks("ranking"):
        rows = stop - start
        texts = load_texts(start, stop, check=False)  # checked in pass 1
        row_img = mapping_dev[start:stop]
        for c0 in range(0, num_images, cols_per_block):
            cols = min(cols_per_block, num_images - c0)
            torch.matmul(texts, images[c0 : c0 + cols_per_block].T, out=scores)
            s, m = scores[:rows, :cols], mask[:rows, :cols]
            r_in = torch.nonzero((row_img >= c0) & (row_img < c0 + cols)).flatten()
            c_in = row_img[r_in] - c0
            pos = s[r_in, c_in]  # the positives' scores, from this very product
            exact[start + r_in] = pos

            if text_band is None:  # every row's positive is in this tile (r_in = all rows)
                compare(s, pos[:, None], out=m)
                text_counts[start:stop] += torch.mv(m, ones_cols[:cols]).to(torch.int64)
            else:
                lo, hi = text_band.lo[start:stop], text_band.hi[start:stop]
                inside, above = text_band.count(s, m, lo[:, None], hi[:, None], ones_cols[:cols], axis=1)
                text_band.above[start:stop] += above
                inside.index_add_(0, r_in, -((pos >= lo[r_in]) & (pos <= hi[r_in])).to(torch.int64))
                sel = torch.nonzero(inside > 0).flatten()
                if sel.numel():
                    sub = s[sel]
                    near = (sub >= lo[sel, None]) & (sub <= hi[sel, None])
                    own = row_img[sel] - c0
                    mine = torch.nonzero((own >= 0) & (own < cols)).flatten()
                    near[mine, own[mine]] = False
                    rr, cc = torch.nonzero(near).unbind(1)
                    text_band.keep(start + sel[rr], sub[rr, cc])

            lo, hi = image_band.lo[c0 : c0 + cols], image_band.hi[c0 : c0 + cols]
            inside, above = image_band.count(s, m, lo[None, :], hi[None, :], ones_rows[:rows], axis=0)
            image_band.above[c0 : c0 + cols] += above
            inside.index_add_(0, c_in, -((pos >= lo[c_in]) & (pos <= hi[c_in])).to(torch.int64))
            sel = torch.nonzero(inside > 0).flatten()
            if sel.numel():
                sub = s[:, sel]
                near = (sub >= lo[None, sel]) & (sub <= hi[None, sel]) & (row_img[:, None] != c0 + sel[None, :])
                rr, cc = torch.nonzero(near).unbind(1)
                image_band.keep(c0 + sel[cc], sub[rr, cc])

    best = torch.full((num_images,), -torch.inf, device=device).scatter_reduce(0, mapping_dev, exact, "amax")
    image_above = image_band.finish(best, compare)
    text_above = None if text_band is None else text_band.finish(exact, compare)
    if image_above is None or (text_band is not None and text_above is None):
        again_i, again_t = _count_with_exact_thresholds(
            row_blocks, load_texts, images, scores, mask, mapping_dev, exact, best, compare,
            num_images, cols_per_block, images_needed=image_above is None,
            texts_needed=text_band is not None and text_above is None,
        )
        image_above = image_above if again_i is None else again_i
        text_above = text_above if again_t is None else again_t

    if text_band is None:
        # the positive itself is counted under the pessimistic rule (it equals its own threshold)
        text_ranks = text_counts if ties == "pessimistic" else 1 + text_counts
    else:
        text_ranks = 1 + text_above
    image_ranks = 1 + image_above
    return Ranks(image_to_text=image_ranks.cpu().numpy(), text_to_image=text_ranks.cpu().numpy())


def _count_with_exact_thresholds(
    row_blocks, load_texts, images, scores, mask, mapping, exact, best, compare, num_images, cols_per_block,
    *, images_needed: bool, texts_needed: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """A second pass over the same products with the exact thresholds: non-positives ranked above the positive."""
    device = images.device
    num_texts = exact.shape[0]
    positive_hits = compare(exact, best[mapping])  # positives counted by the column sweep; subtracted below
    image_counts = -torch.bincount(mapping[positive_hits], minlength=num_images).to(torch.int64)
    text_counts = torch.zeros(num_texts, dtype=torch.int64, device=device)
    rows_per_block = scores.shape[0]
    ones_cols = torch.ones(cols_per_block, device=device)
    ones_rows = torch.ones(rows_per_block, device=device)
    for start, stop in row_blocks("ranking (exact thresholds)"):
        rows = stop - start
        texts = load_texts(start, stop, check=False)
        row_img = mapping[start:stop]
        row_exact = exact[start:stop]
        for c0 in range(0, num_images, cols_per_block):
            cols = min(cols_per_block, num_images - c0)
            torch.matmul(texts, images[c0 : c0 + cols_per_block].T, out=scores)
            s, m = scores[:rows, :cols], mask[:rows, :cols]
            r_in = torch.nonzero((row_img >= c0) & (row_img < c0 + cols)).flatten()
            s[r_in, row_img[r_in] - c0] = -torch.inf  # positives are not counted against themselves
            if texts_needed:
                compare(s, row_exact[:, None], out=m)
                text_counts[start:stop] += torch.mv(m, ones_cols[:cols]).to(torch.int64)
            if images_needed:
                s[r_in, row_img[r_in] - c0] = exact[start + r_in]
                compare(s, best[None, c0 : c0 + cols], out=m)
                image_counts[c0 : c0 + cols] += torch.mv(m.T, ones_rows[:rows]).to(torch.int64)
    return (image_counts if images_needed else None), (text_counts if texts_needed else None)


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

"""Image↔text retrieval evaluation: exact blocked ranking, faiss indexes, an fp16 embedding cache, the CLI."""

from .encode import ImageTextEmbeddings, encode_image_text, encode_images, encode_texts
from .evaluate import clip_benchmark_names, clip_benchmark_result, evaluate_retrieval, markdown_table
from .metrics import Ranks, first_positive_ranks, rank_metrics, recall_at_k
from .search import INDEXES, build_index, exact_topk, index_recall, search_index
from .store import CachedEmbeddings, EmbeddingStore, cache_key, data_fingerprint

__all__ = [
    "INDEXES",
    "CachedEmbeddings",
    "EmbeddingStore",
    "ImageTextEmbeddings",
    "Ranks",
    "build_index",
    "cache_key",
    "clip_benchmark_names",
    "clip_benchmark_result",
    "data_fingerprint",
    "encode_image_text",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "exact_topk",
    "first_positive_ranks",
    "index_recall",
    "markdown_table",
    "rank_metrics",
    "recall_at_k",
    "search_index",
]

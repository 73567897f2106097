"""Modality adapters and their registry."""

from xmodal.adapters.base import ADAPTERS, MODALITIES, ModalityAdapter, project_features
from xmodal.adapters.clip import ImageAdapter, TextAdapter, clip_embed_dim

__all__ = [
    "ADAPTERS",
    "MODALITIES",
    "ImageAdapter",
    "ModalityAdapter",
    "TextAdapter",
    "clip_embed_dim",
    "project_features",
]

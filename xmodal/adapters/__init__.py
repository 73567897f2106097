"""Modality adapters and their registry."""

from xmodal.adapters.base import ADAPTERS, MODALITIES, ModalityAdapter, project_features, with_projection
from xmodal.adapters.clip import ImageAdapter, TextAdapter, clip_embed_dim
from xmodal.adapters.speech import AudioAdapter, AudioContextAdapter, VideoAdapter, VideoContextAdapter

__all__ = [
    "ADAPTERS",
    "AudioAdapter",
    "AudioContextAdapter",
    "VideoAdapter",
    "VideoContextAdapter",
    "MODALITIES",
    "ImageAdapter",
    "ModalityAdapter",
    "TextAdapter",
    "clip_embed_dim",
    "project_features",
    "with_projection",
]

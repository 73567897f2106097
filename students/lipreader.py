"""Lip-reading student: 3D-conv front end, ResNet-18-style 2D trunk per frame, temporal encoder, CTC + attention.

Video [B, T, C, H, W] with mask [B, T] → Conv3d (k=(5,7,7), stride (1,2,2)) → BN + ReLU + max-pool → ResNet
BasicBlock stages (64·w, 128·w, 256·w, 512·w channels; `width_mult` w shrinks it for CPU) → global average
pool → Linear to `dim` → Transformer/Conformer → CTC head, plus an attention decoder (hybrid CTC/attention
loss = `ctc` and `attention_ce` in the loss list). The trunk runs on real frames only, so padding costs nothing
and batch-norm statistics never see padded frames. The time axis keeps the video frame rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

import xmodal.adapters.speech  # noqa: F401  (registers the video adapters with the student)
from xmodal.errors import ConfigError
from xmodal.models import register_student
from xmodal.nn.recognizer import TEMPORAL_ENCODERS, SequenceRecognizer, register_recognizer
from xmodal.registry import suggest


@dataclass
class LipReaderConfig:
    """Visual front end + temporal encoder + CTC head + attention decoder; defaults follow LRS-style models."""

    in_channels: int = 1
    width_mult: float = 1.0  # ResNet-18 widths 64·w … 512·w
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # ResNet-18 stage depths
    vocab_size: int = 30  # CharVocab: blank, sos/eos, space, apostrophe, a–z
    dim: int = 256
    encoder: str = "conformer"  # "conformer" or "transformer"
    num_layers: int = 6
    num_heads: int = 4
    ffn_dim: int = 1024
    conv_kernel: int = 15
    decoder_layers: int = 1
    decoder_ffn_dim: int = 1024
    dropout: float = 0.1
    blank: int = 0
    sos: int = 1
    eos: int = 1

    def __post_init__(self) -> None:
        if self.width_mult <= 0:
            raise ConfigError(f"width_mult must be positive, got {self.width_mult}")
        if len(self.blocks) != 4 or any(b < 1 for b in self.blocks):
            raise ConfigError(f"blocks must be four positive stage depths like (2, 2, 2, 2), got {self.blocks}")
        if self.encoder not in TEMPORAL_ENCODERS:
            raise ConfigError(f"unknown encoder '{self.encoder}'{suggest(self.encoder, TEMPORAL_ENCODERS.names())}; "
                              f"known: {', '.join(TEMPORAL_ENCODERS.names())}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} must be divisible by num_heads {self.num_heads}")

    def channels(self) -> list[int]:
        return [max(4, round(c * self.width_mult)) for c in (64, 128, 256, 512)]


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or inplanes != planes:
        down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, down)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class VisualFrontend(nn.Module):
    """Conv3d over the clip, then per real frame: BN + ReLU + max-pool + ResNet stages + average pool."""

    def __init__(self, cfg: LipReaderConfig):
        super().__init__()
        c = cfg.channels()
        self.conv3d = nn.Conv3d(cfg.in_channels, c[0], (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False)
        self.stem = nn.Sequential(nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, inplanes = [], c[0]
        for i, (planes, depth) in enumerate(zip(c, cfg.blocks)):
            stages.append(_stage(inplanes, planes, depth, 1 if i == 0 else 2))
            inplanes = planes
        self.trunk = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(c[-1], cfg.dim)
        self.in_channels = cfg.in_channels

    def forward(self, video: Tensor, mask: Tensor) -> Tensor:
        if video.dim() != 5 or video.shape[2] != self.in_channels:
            raise ValueError(f"LipReader expects video [B, T, {self.in_channels}, H, W], got {list(video.shape)}")
        x = video.masked_fill(~mask[:, :, None, None, None], 0.0).transpose(1, 2)  # [B, C, T, H, W]
        x = self.conv3d(x).transpose(1, 2)  # [B, T, C0, H', W']
        feats = self.proj(self.trunk(self.stem(x[mask])))  # real frames only: [N, dim]
        out = feats.new_zeros(*mask.shape, feats.shape[-1])
        out[mask] = feats
        return out


@register_student("lipreader", family="speech", accepts=lambda cfg: isinstance(cfg, LipReaderConfig))
@register_recognizer("lipreader", LipReaderConfig)
class LipReader(SequenceRecognizer):
    """Lip reader over grayscale (or RGB) mouth crops [B, T, C, H, W] with mask [B, T]."""

    def __init__(self, config: LipReaderConfig | None = None):
        config = config or LipReaderConfig()
        super().__init__(config)
        self.visual = VisualFrontend(config)

    def frontend(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.visual(x, mask), mask


def tiny_lipreader_config(**overrides) -> LipReaderConfig:
    """A CPU-sized lip reader (about 0.2 M parameters) for tests and synthetic benchmarks."""
    base = dict(width_mult=0.125, blocks=(1, 1, 1, 1), dim=64, encoder="transformer", num_layers=2, num_heads=4,
                ffn_dim=128, decoder_layers=1, decoder_ffn_dim=128, dropout=0.0)
    base.update(overrides)
    return LipReaderConfig(**base)


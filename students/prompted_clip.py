"""Prompted CLIP student (PromptKD): a frozen open_clip ViT image encoder with deep visual prompts, and a projector
from its embedding width to the teacher's.

Deep visual prompts (IVLP / VPT-deep): `n` learnable tokens are appended after the patch tokens at the input (after
the positional embedding, through `ln_pre` like every token) and replaced by fresh learnable tokens before each of
the first `depth` transformer blocks; blocks after that carry the last ones along. The class token stays at
position 0, and the prompt tokens are dropped before pooling, so class-token, average and attention pooling see
exactly the tokens the plain encoder has. With `n = 0` the encoder computes what open_clip's own forward computes.

Only the prompts and the projector train. The student's native features are `norm(g(s(x)))` in the teacher's width:
what evaluation classifies against the teacher's stored class vectors, so no loss trains through a projection that
evaluation skips. Prompts and projector are saved on their own (`save_prompts`, a small safetensors file), and
`export_merged` writes the whole image encoder, prompts included, as a `torch.export` program that plain torch loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.adapters import clip_embed_dim
from xmodal.alignment import PROJECTIONS
from xmodal.errors import CheckpointError, ConfigError, DataError
from xmodal.features import Features
from xmodal.fingerprint import model_fingerprint
from xmodal.models import register_student

PROMPTS_FORMAT = "xmodal-prompts"
PROMPTS_VERSION = 1
MERGED_PROGRAM = "image_encoder.pt2"
MERGED_CONFIG = "prompted_clip.json"
MERGED_CLASSES = "class_vectors.pt"


def _vision_transformer_type() -> type:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer


class PromptedVisionTransformer(nn.Module):
    """An open_clip `VisionTransformer`, frozen, with `n_prompts` deep visual prompt tokens over its first `depth`
    blocks: images [B, 3, H, W] → the encoder's own embedding [B, output_dim]."""

    def __init__(self, visual: nn.Module, n_prompts: int = 4, depth: int = 1, init_std: float = 0.02):
        super().__init__()
        if not isinstance(visual, _vision_transformer_type()):
            raise ConfigError(
                f"deep visual prompts need an open_clip ViT image tower (VisionTransformer), got "
                f"{type(visual).__name__}; choose a ViT student (e.g. ViT-B-16), not a ResNet or timm tower"
            )
        for name in ("_embeds", "_pool"):
            if not callable(getattr(visual, name, None)):
                raise ConfigError(
                    f"this open_clip version's VisionTransformer lacks {name}(); install open_clip_torch>=3.0")
        layers = len(visual.transformer.resblocks)
        if int(n_prompts) != n_prompts or n_prompts < 0:
            raise ConfigError(f"student.prompts.n must be a non-negative integer, got {n_prompts}")
        if n_prompts and not 1 <= depth <= layers:
            raise ConfigError(
                f"student.prompts.depth must be between 1 and the encoder's {layers} blocks, got {depth}"
            )
        self.visual = visual.eval().requires_grad_(False)
        self.n_prompts = int(n_prompts)
        self.depth = int(depth) if n_prompts else 0
        self.width = int(visual.transformer.width)
        self.prompts = nn.Parameter(torch.randn(self.depth, self.n_prompts, self.width) * init_std)

    @property
    def output_dim(self) -> int:
        proj = getattr(self.visual, "proj", None)
        return int(proj.shape[1]) if proj is not None else self.width

    def train(self, mode: bool = True) -> PromptedVisionTransformer:
        super().train(mode)
        self.visual.eval()  # the frozen encoder never trains: no dropout, no patch dropout
        return self

    def forward(self, images: Tensor) -> Tensor:
        v, n = self.visual, self.n_prompts
        x = v._embeds(images)  # [B, 1 + patches, W]: class token, patches, positions, patch dropout, ln_pre
        b = x.shape[0]
        if n:
            x = torch.cat([x, v.ln_pre(self.prompts[0]).to(x.dtype).expand(b, -1, -1)], dim=1)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(blocks):
            if n and 0 < i < self.depth:  # deep prompts: this block's own tokens replace the previous ones
                p = self.prompts[i].to(x.dtype)
                if batch_first:
                    x = torch.cat([x[:, :-n], p.expand(b, -1, -1)], dim=1)
                else:
                    x = torch.cat([x[:-n], p[:, None].expand(-1, b, -1)], dim=0)
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        if n:
            x = x[:, :-n]  # prompts never reach the pooling: avg/attention pooling see the image tokens only
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled


class PromptedCLIP(nn.Module):
    """The PromptKD student: prompted frozen image encoder + projector `g` into the teacher's width.

    `forward(batch)` → {"image": Features(pooled=norm(g(s(x))), logits=τ_s·pooled·W_Tᵀ, logit_scale=τ_s)} with
    `W_T` the class vectors set by `set_class_vectors` (logits only when they are set) and τ_s the student CLIP's
    own (frozen) temperature. Class vectors are a non-persistent buffer: checkpoints do not depend on the class list.
    """

    def __init__(self, clip: nn.Module, *, teacher_dim: int, n_prompts: int = 4, depth: int = 1,
                 projector: str = "mlp", image_key: str = "image", init_std: float = 0.02):
        super().__init__()
        visual = getattr(clip, "visual", None)
        if visual is None:
            raise ConfigError(
                f"a prompted student needs an open_clip CLIP with an image tower, got {type(clip).__name__}")
        self.encoder = PromptedVisionTransformer(visual, n_prompts, depth, init_std)
        self.student_dim = int(clip_embed_dim(clip))
        if self.student_dim != self.encoder.output_dim:
            raise ConfigError(f"the image tower outputs width {self.encoder.output_dim}, the CLIP embeds in "
                              f"{self.student_dim}; an open_clip CLIP with a projected image tower is needed")
        self.teacher_dim = int(teacher_dim)
        self.projector_kind = projector
        self.projector = PROJECTIONS.build(projector, in_dim=self.student_dim, out_dim=self.teacher_dim)
        scale = getattr(clip, "logit_scale", None)
        tau = scale.detach().exp().float().reshape(()) if isinstance(scale, Tensor) else torch.tensor(100.0)
        self.register_buffer("logit_scale", tau.clone())
        self.register_buffer("class_vectors", torch.zeros(0, self.teacher_dim), persistent=False)
        self.image_key = image_key
        self._encoder_fingerprint: str | None = None

    # ------------------------------------------------------------ parameters and identity

    def trainable_state(self) -> dict[str, Tensor]:
        """What training changes: the prompts and the projector (everything else is the frozen encoder)."""
        state = {"prompts": self.encoder.prompts.detach()}
        state.update({f"projector.{k}": v.detach() for k, v in self.projector.state_dict().items()})
        return state

    @property
    def encoder_fingerprint(self) -> str:
        """Identity of the frozen image tower (weights + prompt geometry), recorded in prompt files."""
        if self._encoder_fingerprint is None:
            self._encoder_fingerprint = model_fingerprint(self.encoder.visual, {"kind": "open_clip visual"})
        return self._encoder_fingerprint

    def describe(self) -> dict[str, Any]:
        return {"n_prompts": self.encoder.n_prompts, "depth": self.encoder.depth, "width": self.encoder.width,
                "student_dim": self.student_dim, "teacher_dim": self.teacher_dim, "projector": self.projector_kind}

    # ------------------------------------------------------------ class vectors and encoding

    def set_class_vectors(self, class_vectors: Tensor) -> None:
        """Use `class_vectors` [C, D_t] (the teacher's, normalised) for the logits."""
        if class_vectors.dim() != 2 or class_vectors.shape[1] != self.teacher_dim:
            raise ConfigError(
                f"class vectors of shape {list(class_vectors.shape)} do not fit this student's projector, which "
                f"maps its {self.student_dim}-wide embeddings to width {self.teacher_dim}; use class vectors of the "
                "teacher the projector was built for"
            )
        self.class_vectors = class_vectors.detach().to(self.logit_scale.device, torch.float32).clone()

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """norm(g(s(x))): the embedding evaluation classifies against the teacher's class vectors."""
        emb = self.projector(self.encoder(images))
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Features]:
        if self.image_key not in batch:
            raise DataError(f"the prompted student reads batch['{self.image_key}'], the batch has: {', '.join(batch)}")
        pooled = self.encode_image(batch[self.image_key])
        logits = None
        if self.class_vectors.numel():
            logits = self.logit_scale * pooled.float() @ self.class_vectors.t()
        return {"image": Features(pooled=pooled, logits=logits, logit_scale=self.logit_scale)}

    # ------------------------------------------------------------ prompt files

    def save_prompts(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
        """Write prompts + projector (and what they fit) to a small safetensors file, atomically."""
        from safetensors.torch import save

        from xmodal.io import atomic_write

        info = {"format": PROMPTS_FORMAT, "version": PROMPTS_VERSION, **self.describe(),
                "encoder": self.encoder_fingerprint, **dict(meta or {})}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        data = save(tensors, metadata={"xmodal": json.dumps(info, default=str)})
        path = Path(path)
        with atomic_write(path) as f:
            f.write(data)
        return path

    def load_prompts(self, path: str | os.PathLike, *, check_encoder: bool = True) -> dict[str, Any]:
        """Load prompts + projector written by `save_prompts`; a file made for another geometry, width or image
        encoder is refused, naming what differs. Returns the file's metadata."""
        tensors, info = read_prompts(path)
        mine = self.describe()
        for key in ("n_prompts", "depth", "width", "projector"):
            if info.get(key) != mine[key]:
                raise CheckpointError(f"{path}: prompts made for {key} = {info.get(key)}, this student has "
                                      f"{mine[key]}; build the student with the file's settings")
        for key, what in (("student_dim", "the student's embedding width"), ("teacher_dim", "the teacher's width")):
            if info.get(key) != mine[key]:
                raise ConfigError(
                    f"{path}: its projector maps {info.get('student_dim')} → {info.get('teacher_dim')}, but "
                    f"{what} here is {mine[key]} (student {mine['student_dim']} → teacher {mine['teacher_dim']}); "
                    "use the student and teacher the prompts were trained with"
                )
        if check_encoder and info.get("encoder") != self.encoder_fingerprint:
            raise CheckpointError(
                f"{path}: the prompts were trained on another image encoder ({info.get('encoder')}, this one is "
                f"{self.encoder_fingerprint}); load them onto the student CLIP they were trained with"
            )
        with torch.no_grad():
            self.encoder.prompts.copy_(tensors["prompts"])
            proj = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
            try:
                self.projector.load_state_dict(proj)
            except RuntimeError as e:
                raise CheckpointError(f"{path}: projector weights do not fit this projector: {e}") from e
        return info


def read_prompts(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a prompt file; a missing or foreign file is a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"prompt file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta.get("xmodal", "{}"))
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable prompt file ({type(e).__name__}: {e})") from e
    if info.get("format") != PROMPTS_FORMAT or "prompts" not in tensors:
        raise CheckpointError(f"{path}: not an xmodal prompt file (no '{PROMPTS_FORMAT}' metadata)")
    return tensors, info


# ---------------------------------------------------------------------------------------------- factory


@register_student("prompted_clip", family="clip")
def build_prompted_clip(cfg: Any, clip: nn.Module, *, teacher_dim: int, device: Any = None) -> PromptedCLIP:
    """Student kind "prompted_clip": `clip` (a loaded open_clip CLIP, frozen here) with the prompts and projector
    that `cfg` describes (`n_prompts`/`depth`/`projector` keys or attributes, or a `prompts` block with n/depth)."""
    from xmodal.models import config_value

    prompts = config_value(cfg, "prompts")
    n = config_value(prompts, "n", 4) if prompts is not None else config_value(cfg, "n_prompts", 4)
    depth = config_value(prompts, "depth", 1) if prompts is not None else config_value(cfg, "depth", 1)
    init_std = config_value(prompts, "init_std", 0.02) if prompts is not None else 0.02
    model = PromptedCLIP(clip, teacher_dim=teacher_dim, n_prompts=n, depth=depth,
                         projector=config_value(cfg, "projector", "mlp") or "mlp", init_std=init_std)
    return model.to(device) if device is not None else model


# ---------------------------------------------------------------------------------------------- merged export


class _MergedEncoder(nn.Module):
    """images → norm(g(s(x))) with the prompts as constants: what `export_merged` traces."""

    def __init__(self, student: PromptedCLIP):
        super().__init__()
        self.encoder = student.encoder
        self.projector = student.projector

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.projector(self.encoder(images)), dim=-1)


def export_merged(student: PromptedCLIP, out_dir: str | os.PathLike, *, image_size: int,
                  preprocess_cfg: Mapping[str, Any] | None = None, classnames: list[str] | None = None,
                  templates: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write the prompted image encoder + projector as one `torch.export` program (`image_encoder.pt2`), with its
    preprocessing and, when set, the class vectors and class names: loadable with plain torch, without xmodal:

        program = torch.export.load("DIR/image_encoder.pt2").module()
        emb = program(images)                                   # [B, D_t], L2-normalised
        cv = torch.load("DIR/class_vectors.pt", weights_only=True)
        logits = cv["logit_scale"] * emb @ cv["class_vectors"].T

    The folder is staged and renamed into place, and checked by loading the program back.
    """
    from xmodal.io import atomic_torch_save
    from xmodal.students.export import _staging_dir

    merged = _MergedEncoder(student).eval()
    device = student.logit_scale.device
    example = torch.zeros(2, 3, image_size, image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(merged, (example,), dynamic_shapes={"images": {0: batch}})
        probe = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
        expected = merged(probe)
    out = Path(out_dir)
    with _staging_dir(out, overwrite) as tmp:
        torch.export.save(program, str(tmp / MERGED_PROGRAM))
        config = {"format": "xmodal-prompted-clip", "image_size": int(image_size), **student.describe(),
                  "logit_scale": float(student.logit_scale), "preprocess_cfg": dict(preprocess_cfg or {}),
                  "classnames": classnames, "templates": templates}
        (tmp / MERGED_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
        if student.class_vectors.numel():
            atomic_torch_save({"class_vectors": student.class_vectors.detach().cpu(),
                               "logit_scale": student.logit_scale.detach().cpu()}, tmp / MERGED_CLASSES)
        loaded = torch.export.load(str(tmp / MERGED_PROGRAM)).module()
        with torch.no_grad():
            got = loaded(probe)
        if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            raise CheckpointError("the exported program computes other embeddings than the student; not exported")
    return out


__all__ = [
    "MERGED_CLASSES",
    "MERGED_CONFIG",
    "MERGED_PROGRAM",
    "PromptedCLIP",
    "PromptedVisionTransformer",
    "build_prompted_clip",
    "export_merged",
    "read_prompts",
]

"""Automatic weight inheritance (TinyCLIP): learn which layers, heads and MLP channels to keep, then fuse.

A copy of the teacher gets hard-concrete (L0) gates on every layer, attention head and MLP channel of both
towers. The gates scale the block outputs (out_proj / c_proj), so a closed gate removes its unit exactly.
Gates are trained on the distillation loss plus a Lagrangian sparsity term (CoFi / TinyCLIP) that drives the
expected share of kept block parameters to the target; `fuse` then keeps the top-scoring layers, heads and
channels in the uniform shape of an open_clip student config. Residual and embedding widths are not gated:
when the target narrows them, their channels are chosen by weight magnitude.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from xmodal.errors import ConfigError

TOWERS = ("vision", "text")


class HardConcreteGate(nn.Module):
    """L0 gates (Louizos et al. 2018): stretched, clamped concrete samples with learnable log α.

    Training draws `z = clamp(sigmoid((log u − log(1−u) + log α)/β)·(ζ−γ) + γ, 0, 1)`; eval uses the
    noise-free value. `init` is the initial log α (3.0 keeps every gate fully open at eval).
    """

    def __init__(self, shape: tuple[int, ...], init: float = 3.0, beta: float = 2 / 3,
                 limits: tuple[float, float] = (-0.1, 1.1)):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, float(init)))
        self.beta = beta
        self.gamma, self.zeta = limits

    def forward(self) -> Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_open(self) -> Tensor:
        """P(z > 0) per gate: the expected share of the unit that survives."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))


class _GateState:
    """Current gate values per tower (plain object: parametrizations read it without joining the module tree)."""

    def __init__(self):
        self.z: dict[str, dict[str, Tensor]] = {}


class _GateColumns(nn.Module):
    """Parametrization of out_proj / c_proj: scale input columns (heads or MLP channels) and the layer gate."""

    def __init__(self, state: _GateState, tower: str, layer: int, kind: str, head_dim: int = 1):
        super().__init__()
        self.state, self.tower, self.layer, self.kind, self.head_dim = state, tower, layer, kind, head_dim

    def gate(self) -> Tensor:
        z = self.state.z[self.tower]
        unit = z[self.kind][self.layer]
        if self.kind == "heads":
            unit = unit.repeat_interleave(self.head_dim)
        return z["layers"][self.layer] * unit

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.gate().to(weight.dtype)[None, :]


class _GateBias(nn.Module):
    """Parametrization of a block output bias: scaled by the layer gate."""

    def __init__(self, state: _GateState, tower: str, layer: int):
        super().__init__()
        self.state, self.tower, self.layer = state, tower, layer

    def forward(self, bias: Tensor) -> Tensor:
        return bias * self.state.z[self.tower]["layers"][self.layer].to(bias.dtype)


def _blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    from open_clip.transformer import VisionTransformer

    if tower == "vision":
        if not isinstance(model.visual, VisionTransformer):
            raise ConfigError("automatic inheritance gates ViT image towers; this teacher's image tower is "
                              f"{type(model.visual).__name__}")
        return model.visual.transformer.resblocks
    text = getattr(model, "text", model)
    if not hasattr(text, "transformer"):
        raise ConfigError(f"automatic inheritance gates open_clip text transformers, not {type(text).__name__}")
    return text.transformer.resblocks


class MaskedCLIP(nn.Module):
    """A gated copy of an open_clip CLIP; use `encode_image` / `encode_text` (they draw fresh gates)."""

    def __init__(self, teacher: nn.Module, init: float = 3.0, train_weights: bool = False):
        super().__init__()
        self.model = copy.deepcopy(teacher)
        self.model.requires_grad_(train_weights)
        self.__dict__["_template"] = copy.deepcopy(teacher).to("meta")  # architecture only, no memory
        self._state = _GateState()
        self.gates = nn.ModuleDict()
        self.sizes: dict[str, dict[str, int]] = {}
        for tower in TOWERS:
            blocks = _blocks(self.model, tower)
            heads = {int(b.attn.num_heads) for b in blocks}
            mlps = {int(b.mlp.c_fc.out_features) for b in blocks}
            if len(heads) != 1 or len(mlps) != 1:
                raise ConfigError(f"{tower} tower: automatic inheritance needs the same heads and MLP width in "
                                  "every layer")
            width, n_heads, mlp = int(blocks[0].mlp.c_fc.in_features), heads.pop(), mlps.pop()
            self.sizes[tower] = {"layers": len(blocks), "width": width, "heads": n_heads, "mlp": mlp}
            self.gates[tower] = nn.ModuleDict({
                "layers": HardConcreteGate((len(blocks),), init),
                "heads": HardConcreteGate((len(blocks), n_heads), init),
                "mlp": HardConcreteGate((len(blocks), mlp), init),
            })
            self.resample(tower)
            for i, b in enumerate(blocks):
                parametrize.register_parametrization(
                    b.attn.out_proj, "weight", _GateColumns(self._state, tower, i, "heads", width // n_heads))
                parametrize.register_parametrization(b.mlp.c_proj, "weight", _GateColumns(self._state, tower, i, "mlp"))
                for lin in (b.attn.out_proj, b.mlp.c_proj):
                    if lin.bias is not None:
                        parametrize.register_parametrization(lin, "bias", _GateBias(self._state, tower, i))
        self.resample()
        self.lambdas = nn.Parameter(torch.zeros(2))  # Lagrange multipliers, maximised

    def resample(self, tower: str | None = None) -> None:
        """Draw gate values (noise in train mode, deterministic in eval mode)."""
        for t in (tower,) if tower else TOWERS:
            self._state.z[t] = {k: g() for k, g in self.gates[t].items()}

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        self.resample("vision")
        return self.model.encode_image(image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        self.resample("text")
        return self.model.encode_text(text, normalize=normalize)

    # ------------------------------------------------------------------------------------- sparsity

    def _block_params(self, tower: str, layers: Tensor, heads: Tensor, mlp: Tensor) -> Tensor:
        s = self.sizes[tower]
        head_dim = s["width"] // s["heads"]
        per_layer = 4 * s["width"] * head_dim * heads + 2 * s["width"] * mlp
        return (layers * per_layer).sum()

    def expected_density(self) -> Tensor:
        """Expected share of gated block parameters (attention q/k/v/out per head, MLP in/out per channel) kept."""
        kept, full = 0.0, 0.0
        for tower, g in self.gates.items():
            s = self.sizes[tower]
            kept = kept + self._block_params(tower, g["layers"].prob_open(), g["heads"].prob_open().sum(1),
                                             g["mlp"].prob_open().sum(1))
            full += float(self._block_params(tower, torch.ones(s["layers"]), torch.full((s["layers"],), s["heads"]),
                                             torch.full((s["layers"],), s["mlp"])))
        return kept / full

    def target_density(self, student_cfg: Mapping[str, Any]) -> float:
        """The density of the fused student's block units at the teacher's residual width."""
        kept, full = 0.0, 0.0
        for tower, key in (("vision", "vision_cfg"), ("text", "text_cfg")):
            s, c = self.sizes[tower], student_cfg[key]
            width = int(c.get("width", s["width"]))
            heads = width // int(c["head_width"]) if tower == "vision" and "head_width" in c else int(
                c.get("heads", s["heads"] * width // s["width"]))
            mlp = int(width * float(c.get("mlp_ratio", s["mlp"] / s["width"])))
            n = int(c.get("layers", s["layers"]))
            kept += float(self._block_params(tower, torch.ones(n), torch.full((n,), heads), torch.full((n,), mlp)))
            full += float(self._block_params(tower, torch.ones(s["layers"]), torch.full((s["layers"],), s["heads"]),
                                             torch.full((s["layers"],), s["mlp"])))
        return kept / full

    def sparsity_loss(self, target: float) -> Tensor:
        """Lagrangian λ₁(d − t) + λ₂(d − t)²: minimised by the gates, maximised by the multipliers."""
        gap = self.expected_density() - target
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap

    def mask_parameters(self) -> list[nn.Parameter]:
        return [g.log_alpha for tower in self.gates.values() for g in tower.values()]

    # ------------------------------------------------------------------------------------- fusing

    def scores(self) -> dict[str, Tensor]:
        """Learned importance (log α) per group, keyed like `inherit_weights(scores=...)`."""
        out = {}
        for tower, g in self.gates.items():
            out[f"{tower}.layers"] = g["layers"].log_alpha.detach().clone()
            for i in range(self.sizes[tower]["layers"]):
                out[f"{tower}.{i}.heads"] = g["heads"].log_alpha[i].detach().clone()
                out[f"{tower}.{i}.mlp"] = g["mlp"].log_alpha[i].detach().clone()
        return out

    @torch.no_grad()
    def folded(self) -> nn.Module:
        """A plain open_clip model with the eval-mode gates multiplied into its weights."""
        was = self.training
        self.eval()
        self.resample()
        state = {k: v for k, v in self.model.state_dict().items() if ".parametrizations." not in k}
        for name, module in self.model.named_modules():
            if parametrize.is_parametrized(module):
                for pname in module.parametrizations:
                    state[f"{name}.{pname}"] = getattr(module, pname).detach().clone()
        self.train(was)
        device = next(self.model.parameters()).device
        model = copy.deepcopy(self.__dict__["_template"]).to_empty(device=device)
        model.load_state_dict(state, strict=True)
        plain_buffers = dict(model.named_buffers())
        for name, buf in self.model.named_buffers():  # non-persistent buffers (e.g. the causal mask)
            plain_buffers[name].copy_(buf)
        return model.requires_grad_(False)

    def fuse(self, student_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None):
        """Build the student of `student_cfg` from the top-scoring layers/heads/channels; returns (student, report)."""
        from xmodal.students.clip import create_student
        from xmodal.students.inheritance import inherit_weights

        student = create_student(student_cfg, preprocess_cfg).to(next(self.model.parameters()).device)
        s_layers = {"vision": len(_blocks(student, "vision")), "text": len(_blocks(student, "text"))}
        layers = {}
        for tower in TOWERS:
            la = self.gates[tower]["layers"].log_alpha.detach()
            if s_layers[tower] > la.numel():
                raise ConfigError(f"{tower}: the student has more layers ({s_layers[tower]}) than the teacher")
            layers[tower] = sorted(torch.topk(la, s_layers[tower]).indices.tolist())
        scores = {k: v for k, v in self.scores().items() if not k.endswith(".layers")}
        report = inherit_weights(self.folded(), student, layers=layers, channels="importance", scores=scores)
        report["mode"] = "auto"
        report["density"] = float(self.expected_density().detach())
        return student, report


def learn_masks(
    masked: MaskedCLIP,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    loss_fn: Callable[[dict, dict, Mapping], Tensor],
    student_cfg: Mapping[str, Any],
    *,
    steps: int,
    lr: float = 0.05,
    lambda_lr: float = 0.05,
    warmup_steps: int = 0,
) -> list[dict[str, float]]:
    """Train the gates (and weights, if `train_weights`) on `loss_fn` plus the sparsity Lagrangian.

    `loss_fn(student_feats, teacher_feats, batch)` gets `{"image": Tensor, "text": Tensor}` embeddings; the
    target density ramps linearly from 1 to the student's over `warmup_steps`. Returns per-step logs.
    """
    from xmodal.features import Features

    final = masked.target_density(student_cfg)
    params = [p for p in masked.model.parameters() if p.requires_grad] + masked.mask_parameters()
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=lr)
    opt_lambda = torch.optim.AdamW([masked.lambdas], lr=lambda_lr, weight_decay=0.0, maximize=True)
    teacher.eval()
    masked.train()
    history = []
    for step, batch in zip(range(steps), batches):
        target = final if step >= warmup_steps else 1.0 - (1.0 - final) * (step + 1) / max(1, warmup_steps)
        with torch.no_grad():
            t = {"image": Features(teacher.encode_image(batch["image"])),
                 "text": Features(teacher.encode_text(batch["text"]))}
        s = {"image": Features(masked.encode_image(batch["image"])),
             "text": Features(masked.encode_text(batch["text"]))}
        distill = loss_fn(s, t, batch)
        sparsity = masked.sparsity_loss(target)
        opt.zero_grad(set_to_none=True)
        opt_lambda.zero_grad(set_to_none=True)
        (distill + sparsity).backward()
        opt.step()
        opt_lambda.step()
        history.append({"step": step, "distill": float(distill.detach()), "sparsity": float(sparsity.detach()),
                        "density": float(masked.expected_density().detach()), "target": target})
    return history


__all__ = ["HardConcreteGate", "MaskedCLIP", "learn_masks"]

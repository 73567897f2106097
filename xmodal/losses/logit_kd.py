"""Logit distillation beyond KL: DKD, DIST, TAID (with its adaptive schedule as loss state) and SinKD.

All take [B, C] or masked per-step [B, T, C] logits of one modality (see `LogitLoss`). Batch-level losses (DIST's
intra-class term, SinKD) treat each real step of each kept sample as one row of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from xmodal.errors import ConfigError
from xmodal.losses.base import LossOutput, Outputs, register_loss, sample_weighted_mean
from xmodal.losses.logit import (
    LogitLoss,
    batch_targets,
    check_positive,
    kept_samples,
    kl_div,
    real_rows,
    reduce_steps,
)


@register_loss("dkd")
class DKD(LogitLoss):
    """α·TCKD + β·NCKD, both at T²: binary KL on [p_target, 1 − p_target] plus KL over the non-target classes
    (Zhao et al., 2022, "Decoupled Knowledge Distillation").

    The target is `batch[label_key]` ([B] or [B, T] class ids), or the teacher's top class when label_key is null.
    """

    def __init__(
        self,
        modality: str = "image",
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        label_key: str | None = "label",
    ):
        super().__init__(modality, temperature)
        self.alpha, self.beta = float(alpha), float(beta)
        self.label_key = label_key

    def batch_keys(self) -> list[str]:
        return [self.label_key] if self.label_key else []

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        y = batch_targets(batch, self.label_key, zt, self.name)
        t = self.temperature
        log_p_s = torch.log_softmax(zs / t, dim=-1)
        log_p_t = torch.log_softmax(zt / t, dim=-1)
        gt = torch.zeros_like(zs, dtype=torch.bool).scatter_(-1, y.unsqueeze(-1), True)
        neg_inf = torch.full((), -math.inf, device=zs.device)

        def binary(log_p: Tensor) -> Tensor:  # log [p_target, 1 − p_target], the latter as a stable logsumexp
            target = log_p.gather(-1, y.unsqueeze(-1))
            rest = torch.logsumexp(torch.where(gt, neg_inf, log_p), dim=-1, keepdim=True)
            return torch.cat([target, rest], dim=-1)

        tckd = kl_div(binary(log_p_t), binary(log_p_s)) * t * t
        # non-target distributions: softmax over the other classes (the target class masked out)
        nt_s = torch.log_softmax(torch.where(gt, neg_inf, zs / t), dim=-1)
        nt_t = torch.log_softmax(torch.where(gt, neg_inf, zt / t), dim=-1)
        nckd = kl_div(nt_t, nt_s) * t * t
        tckd = sample_weighted_mean(reduce_steps(tckd, mask), batch)
        nckd = sample_weighted_mean(reduce_steps(nckd, mask), batch)
        return LossOutput(self.alpha * tckd + self.beta * nckd, {"tckd": tckd.detach(), "nckd": nckd.detach()})


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of the rows of a and b [N, K] → [N]."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register_loss("dist")
class DIST(LogitLoss):
    """T²·[β·(1 − mean_i ρ(p_S,i, p_T,i)) + γ·(1 − mean_c ρ(p_S,:c, p_T,:c))], ρ the Pearson correlation across
    classes (inter-class) and across the batch (intra-class) (Huang et al., 2022, "Knowledge Distillation from
    A Stronger Teacher")."""

    def __init__(self, modality: str = "image", temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__(modality, temperature)
        self.beta, self.gamma = float(beta), float(gamma)

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        keep = kept_samples(batch, zs.shape[0], zs.device)
        t = self.temperature
        p_s = real_rows(torch.softmax(zs / t, dim=-1), mask, keep)
        p_t = real_rows(torch.softmax(zt / t, dim=-1), mask, keep)
        if p_s.shape[0] == 0:  # every sample filtered out: nothing to compare
            zero = zs.sum() * 0.0
            return LossOutput(zero, {"inter": zero.detach(), "intra": zero.detach()})
        inter = (1.0 - pearson(p_s, p_t).mean()) * t * t
        intra = (1.0 - pearson(p_s.t(), p_t.t()).mean()) * t * t
        loss = self.beta * inter + self.gamma * intra
        return LossOutput(loss, {"inter": inter.detach(), "intra": intra.detach()})


@register_loss("taid")
class TAID(LogitLoss):
    """T²·KL(p_t ‖ q_S), p_t = softmax(((1 − t)·sg(z_S) + t·z_T) / T), t rising from t_start to t_end on an adaptive
    schedule (Shing et al., 2025, "TAID: Temporally Adaptive Interpolated Distillation").

    Each training call (`loss.training` with gradients on) moves t: the momentum m of the loss's relative decrease
    gives `t ← min(t_end, max(t_linear, t + alpha·sigmoid(m)·(1 − t)))` with t_linear the linear ramp over
    `total_steps` calls (train.steps × train.grad_accum). t, m, the previous loss and the call count are buffers,
    so checkpoints save them and resume restores them. `adaptive: false` follows the linear ramp alone.
    """

    required_params: ClassVar[dict] = {"total_steps": 1000}  # no usable default; an example for `xmodal losses`

    def __init__(
        self,
        modality: str = "image",
        temperature: float = 1.0,
        total_steps: int | None = None,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ):
        super().__init__(modality, temperature)
        if total_steps is None or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(
                f"loss '{self.name}': total_steps must be a positive integer (the number of training steps, "
                f"train.steps × train.grad_accum), got {total_steps!r}"
            )
        if not (0.0 <= t_start < 1.0 and 0.0 < t_end <= 1.0 and t_start <= t_end):
            raise ConfigError(
                f"loss '{self.name}': need 0 <= t_start < 1, 0 < t_end <= 1 and t_start <= t_end; got "
                f"t_start={t_start}, t_end={t_end}"
            )
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta < 1.0):
            raise ConfigError(f"loss '{self.name}': need 0 <= alpha <= 1 and 0 <= beta < 1; got {alpha}, {beta}")
        self.total_steps = total_steps
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.alpha, self.beta = float(alpha), float(beta)
        self.adaptive = bool(adaptive)
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float32))
        self.register_buffer("momentum", torch.zeros((), dtype=torch.float32))
        self.register_buffer("prev_loss", torch.zeros((), dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        temp = self.temperature
        t = self.t.detach().float()
        target = (1.0 - t) * zs.detach() + t * zt
        div = kl_div(torch.log_softmax(target / temp, dim=-1), torch.log_softmax(zs / temp, dim=-1)) * temp * temp
        loss = sample_weighted_mean(reduce_steps(div, mask), batch)
        t_used = t.clone()
        if self.training and torch.is_grad_enabled():
            self.update(loss.detach())
        return LossOutput(loss, {"t": t_used})

    @torch.no_grad()
    def update(self, loss: Tensor) -> None:
        """One step of the schedule from this call's loss (a non-finite loss leaves the state as it is)."""
        loss = loss.float().to(self.t.device)
        finite = torch.isfinite(loss)
        first = self.steps == 0
        rel = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        progress = (self.steps.float() / self.total_steps).clamp(max=1.0)
        linear = self.t_start + (self.t_end - self.t_start) * progress
        if self.adaptive:
            stepped = self.t + self.alpha * torch.sigmoid(momentum) * (1.0 - self.t)
            t_new = torch.clamp(torch.maximum(linear, stepped), max=self.t_end)
        else:
            t_new = linear
        move = finite & ~first  # the first call only records its loss
        self.t.copy_(torch.where(move, t_new, self.t))
        self.momentum.copy_(torch.where(move, momentum, self.momentum))
        self.prev_loss.copy_(torch.where(finite, loss, self.prev_loss))
        self.steps.add_(finite.long())


@register_loss("sinkd")
class SinKD(LogitLoss):
    """Σ_ij P_ij·‖p_S,i − p_T,j‖₁ with P the entropic (ε) optimal transport plan between the batch's student and
    teacher distributions, uniform marginals (Cui et al., 2024, "SinKD: Sinkhorn Distance Minimization for
    Knowledge Distillation").

    Batch-level: compares the two sets of distributions, so rows may match across samples; it approaches 0 at
    student = teacher as ε → 0. Sinkhorn runs `iterations` log-domain steps; gradients flow through them.
    """

    def __init__(
        self, modality: str = "image", temperature: float = 1.0, epsilon: float = 0.1, iterations: int = 20
    ):
        super().__init__(modality, temperature)
        check_positive(self.name, epsilon=epsilon)
        if not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"loss '{self.name}': iterations must be a positive integer, got {iterations!r}")
        self.epsilon = float(epsilon)
        self.iterations = iterations

    def forward(self, student: Outputs, teacher: Outputs | None = None, batch: Mapping | None = None) -> LossOutput:
        zs, zt, mask = self.logits(student, teacher)
        keep = kept_samples(batch, zs.shape[0], zs.device)
        t = self.temperature
        p_s = real_rows(torch.softmax(zs / t, dim=-1), mask, keep)
        p_t = real_rows(torch.softmax(zt / t, dim=-1), mask, keep)
        if p_s.shape[0] == 0:  # every sample filtered out: nothing to compare
            return LossOutput(zs.sum() * 0.0)
        cost = torch.cdist(p_s, p_t, p=1)  # [N, N] L1 distances between student row i and teacher row j
        plan = sinkhorn_plan(cost, self.epsilon, self.iterations)
        return LossOutput((plan * cost).sum())


def sinkhorn_plan(cost: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Entropic transport plan [N, M] between uniform marginals for `cost`, by log-domain Sinkhorn iterations."""
    n, m = cost.shape
    log_k = -cost / epsilon
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(iterations):
        f = log_a - torch.logsumexp(log_k + g[None, :], dim=1)
        g = log_b - torch.logsumexp(log_k + f[:, None], dim=0)
    return torch.exp(log_k + f[:, None] + g[None, :])

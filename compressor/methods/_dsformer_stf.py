"""DSFormer's Straight-Through Factorizer (STF): train D and a dense latent S~ end to end.

Forward uses the projection of S~ onto the sparsity pattern (top-N-of-M per column group, or top-s
per column); backward passes the gradient of the projected S to S~ unchanged (straight-through),
so entries outside the current support keep receiving gradient and can enter it: the support moves
during training. Only the factors train; the rest of the model is frozen.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import Context
from ._dsformer_factor import SparsePattern


def straight_through_project(s_latent: Tensor, d: Tensor, pattern: SparsePattern) -> Tensor:
    """Projected S (k, in) whose gradient flows to every entry of `s_latent` (identity backward).

    Entries compete by |S~_ij| * ||D_:i||, their contribution to W = D S, so the choice does not
    depend on how scale is split between D and S.
    """
    scores = s_latent.detach().abs() * d.detach().norm(dim=0)[:, None]
    mask = pattern.mask(scores)
    return s_latent + (s_latent * mask - s_latent).detach()


class DenseSparseTrainable(nn.Module):
    """Training-time W = D P(S~): d (out, k) and s_latent (k, in) are parameters; bias frozen."""

    def __init__(self, d: Tensor, s: Tensor, bias: Tensor | None, pattern: SparsePattern) -> None:
        super().__init__()
        self.out_features, self.k = d.shape
        self.in_features = s.shape[1]
        self.pattern = pattern
        self.d = nn.Parameter(d.detach().clone())
        self.s_latent = nn.Parameter(s.detach().clone())
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )

    def sparse_factor(self) -> Tensor:
        return straight_through_project(self.s_latent, self.d, self.pattern)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.sparse_factor()), self.d, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, pattern={self.pattern.describe()}"


def _lm_loss(logits: Tensor, batch: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


def _distill_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) per token on the next-token distributions."""
    vocab = student.shape[-1]
    return F.kl_div(
        F.log_softmax(student.reshape(-1, vocab).float(), -1),
        F.log_softmax(teacher.reshape(-1, vocab).float(), -1),
        log_target=True,
        reduction="batchmean",
    )


def train_stf(
    model: nn.Module,
    windows: Tensor,
    ctx: Context,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    teacher: nn.Module | None = None,
) -> dict[str, list[float]]:
    """AdamW on every DenseSparseTrainable's D and S~ for `steps` batches of token windows (N, T).

    Loss: next-token cross entropy, plus KL to `teacher`'s logits when given. Returns curves:
    "stf_loss" per step and "stf_support_change" (fraction of S entries whose support flipped since
    the start, measured every step).
    """
    layers = [m for m in model.modules() if isinstance(m, DenseSparseTrainable)]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in layers for p in (layer.d, layer.s_latent)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start_support = [(layer.sparse_factor() != 0).detach() for layer in layers]
    total = sum(int(s.sum()) for s in start_support)
    batches = itertools.cycle(windows.split(batch_size))
    curves: dict[str, list[float]] = {"stf_loss": [], "stf_support_change": []}
    model.train()
    try:
        for _ in ctx.progress(range(steps), description="dsformer STF"):
            batch = next(batches).to(ctx.device)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = _lm_loss(logits, batch)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(input_ids=batch, use_cache=False).logits
                loss = loss + _distill_loss(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            curves["stf_loss"].append(loss.item())
            curves["stf_support_change"].append(_support_change(layers, start_support, total))
    finally:
        model.eval()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    if not all(math.isfinite(v) for v in curves["stf_loss"]):
        from ..errors import ModelError

        raise ModelError(f"dsformer: STF loss became non-finite; lower `lr` (got {lr})")
    return curves


@torch.no_grad()
def _support_change(layers: list[DenseSparseTrainable], start: list[Tensor], total: int) -> float:
    """Fraction of the initial support that is no longer in the support (support movement)."""
    moved = sum(
        int((s0 & (layer.sparse_factor() == 0)).sum())
        for layer, s0 in zip(layers, start, strict=True)
    )
    return moved / max(total, 1)


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of the dense model for distillation (made before any layer is replaced)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

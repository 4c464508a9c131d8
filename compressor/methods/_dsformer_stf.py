"""DSFormer's Straight-Through Factorizer (STF): train D and a dense latent S~ end to end.

Forward uses the projection of S~ onto the sparsity pattern (top-N-of-M per column group, or top-s
per column); backward passes the gradient of the projected S to S~ unchanged (straight-through),
so entries outside the current support keep receiving gradient and can enter it: the support moves
during training. Only the factors train; the rest of the model is frozen.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import Context
from ..errors import ModelError
from ..training.config import TrainConfig
from ..training.data import in_order_windows
from ..training.losses import next_token_loss
from ..training.trainer import fit, no_evaluation
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
    """AdamW on every DenseSparseTrainable's D and S~ for `steps` batches of token windows (N, T),
    taken in order (cycled), through `compressor.training.fit` (gradient norm clipped to 1, no
    weight decay, constant `lr`).

    Loss: next-token cross entropy, plus KL to `teacher`'s logits when given. Returns curves:
    "stf_loss" per step and "stf_support_change" (fraction of S entries whose support flipped since
    the start, measured every step).
    """
    layers = [m for m in model.modules() if isinstance(m, DenseSparseTrainable)]
    params = [p for layer in layers for p in (layer.d, layer.s_latent)]
    start_support = [(layer.sparse_factor() != 0).detach() for layer in layers]
    total = sum(int(s.sum()) for s in start_support)
    support_change: list[float] = []

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        input_ids = batch["input_ids"]
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss = next_token_loss(logits, input_ids)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(input_ids=input_ids, use_cache=False).logits
            loss = loss + _distill_loss(logits, target)
        return loss

    config = TrainConfig(
        steps=steps, lr=lr, batch_size=batch_size, seq_len=windows.shape[1], weight_decay=0.0,
        max_grad_norm=1.0, seed=0,
    )  # fmt: skip
    result = fit(
        model, params, config, ctx, loss_fn=loss_fn, eval_fn=no_evaluation,
        data=in_order_windows(windows), method="dsformer-stf",
        after_step=lambda done: support_change.append(_support_change(layers, start_support, total)),
    )  # fmt: skip
    if not all(math.isfinite(v) for v in result.losses):
        raise ModelError(f"dsformer: STF loss became non-finite; lower `lr` (got {lr})")
    return {"stf_loss": result.losses, "stf_support_change": support_change}


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

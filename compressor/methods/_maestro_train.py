"""Maestro's training loop: ordered dropout on one sampled layer per step, self-distillation from
the full pass, the hierarchical group lasso, and progressive shrinking after every epoch.

Loss per step (Maestro-LoD, `--full-pass`):
    CE(f_full(x), y) + CE(f_sampled(x), softmax(f_full(x)).detach()) + gp_lambda * sum_layers GL
where f_sampled truncates ONE layer (from the shuffled (layer, width) list) and runs every other
layer at full width. Without the full pass: CE(f_sampled(x), y) + gp_lambda * sum GL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import Context
from ..errors import ModelError
from ._maestro_layer import MaestroLinear, SingleLayerSampler, kept_rank


@dataclass
class MaestroSchedule:
    """Training knobs (validated by MaestroConfig)."""

    epochs: int = 1
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gp_lambda: float = 5e-3
    threshold: float = 1e-5
    full_pass: bool = True
    seed: int = 0


@dataclass
class MaestroHistory:
    loss: list[float] = field(default_factory=list)
    group_lasso: list[float] = field(default_factory=list)
    total_rank: list[float] = field(default_factory=list)  # after each epoch's shrinking


def _lm_loss(logits: Tensor, batch: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )


def _soft_ce(student: Tensor, teacher: Tensor) -> Tensor:
    """CE of the student against the teacher's (detached) soft distribution, mean over tokens."""
    vocab = student.shape[-1]
    target = F.softmax(teacher.detach().reshape(-1, vocab).float(), dim=-1)
    return -(target * F.log_softmax(student.reshape(-1, vocab).float(), dim=-1)).sum(-1).mean()


def _optimizer(params: list[nn.Parameter], schedule: MaestroSchedule) -> torch.optim.Optimizer:
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    return torch.optim.SGD(
        params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )


def maestro_step(
    model: nn.Module,
    layers: dict[str, MaestroLinear],
    batch: Tensor,
    sampled: tuple[str, int],
    schedule: MaestroSchedule,
) -> tuple[Tensor, Tensor]:
    """Loss of one step (before backward) and its group-lasso term."""
    name, width = sampled
    full_loss = None
    if schedule.full_pass:
        full_logits = model(input_ids=batch, use_cache=False).logits
        full_loss = _lm_loss(full_logits, batch)
    layers[name].width = width
    try:
        sampled_logits = model(input_ids=batch, use_cache=False).logits
    finally:
        layers[name].width = None
    if schedule.full_pass:
        od_loss = _soft_ce(sampled_logits[:, :-1], full_logits[:, :-1])
        loss = full_loss + od_loss
    else:
        loss = _lm_loss(sampled_logits, batch)
    gl = torch.stack([layer.group_lasso() for layer in layers.values()]).sum()
    return loss + schedule.gp_lambda * gl, gl


def shrink(layers: dict[str, MaestroLinear], threshold: float) -> dict[str, int]:
    """Progressive shrinking: cut every layer to the ranks whose importance >= threshold (>= 1 kept)."""
    for layer in layers.values():
        layer.rank = max(1, min(layer.rank, kept_rank(layer.importance(), threshold)))
    return {name: layer.rank for name, layer in layers.items()}


def train_maestro(
    model: nn.Module,
    layers: dict[str, MaestroLinear],
    windows: Tensor,
    ctx: Context,
    schedule: MaestroSchedule,
) -> MaestroHistory:
    """Train the factors (everything else frozen) for `schedule.epochs` passes over `windows` (N, T)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in layers.values() for p in (layer.u, layer.v)]
    for p in params:
        p.requires_grad_(True)
    optimizer = _optimizer(params, schedule)
    sampler = SingleLayerSampler({n: layer.rank for n, layer in layers.items()}, seed=schedule.seed)
    history = MaestroHistory()
    batches = list(windows.split(schedule.batch_size))
    model.train()
    try:
        for epoch in range(schedule.epochs):
            for batch in ctx.progress(
                batches, description=f"maestro epoch {epoch + 1}/{schedule.epochs}"
            ):
                loss, gl = maestro_step(
                    model, layers, batch.to(ctx.device), next(sampler), schedule
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                history.loss.append(loss.item())
                history.group_lasso.append(gl.item())
                if not math.isfinite(history.loss[-1]):
                    raise ModelError(
                        f"maestro: training loss became non-finite at epoch {epoch + 1}; "
                        f"lower `lr` (got {schedule.lr})"
                    )
            ranks = shrink(layers, schedule.threshold)
            sampler.rebuild(ranks)
            history.total_rank.append(float(sum(ranks.values())))
    finally:
        model.eval()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return history

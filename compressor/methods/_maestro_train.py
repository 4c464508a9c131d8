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
from ..training.config import TrainConfig
from ..training.data import in_order_windows
from ..training.losses import next_token_loss
from ..training.trainer import fit, no_evaluation
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
        full_loss = next_token_loss(full_logits, batch)
    layers[name].width = width
    try:
        sampled_logits = model(input_ids=batch, use_cache=False).logits
    finally:
        layers[name].width = None
    if schedule.full_pass:
        od_loss = _soft_ce(sampled_logits[:, :-1], full_logits[:, :-1])
        loss = full_loss + od_loss
    else:
        loss = next_token_loss(sampled_logits, batch)
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
    """Train the factors (everything else frozen) for `schedule.epochs` passes over `windows` (N, T)
    in order, through `compressor.training.fit` (gradient norm clipped to 1, constant `lr`), with
    progressive shrinking after every epoch."""
    params = [p for layer in layers.values() for p in (layer.u, layer.v)]
    sampler = SingleLayerSampler({n: layer.rank for n, layer in layers.items()}, seed=schedule.seed)
    history = MaestroHistory()
    per_epoch = len(windows.split(schedule.batch_size))

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        loss, gl = maestro_step(model, layers, batch["input_ids"], next(sampler), schedule)
        history.group_lasso.append(gl.item())
        return loss

    def end_of_epoch(done: int) -> None:
        if done % per_epoch == 0:
            ranks = shrink(layers, schedule.threshold)
            sampler.rebuild(ranks)
            history.total_rank.append(float(sum(ranks.values())))

    config = TrainConfig(
        steps=schedule.epochs * per_epoch, lr=schedule.lr, batch_size=schedule.batch_size,
        seq_len=windows.shape[1], weight_decay=schedule.weight_decay, max_grad_norm=1.0,
        seed=schedule.seed,
    )  # fmt: skip
    result = fit(
        model, params, config, ctx, loss_fn=loss_fn, eval_fn=no_evaluation,
        data=in_order_windows(windows), method="maestro",
        make_optimizer=lambda trained: _optimizer(trained, schedule), after_step=end_of_epoch,
    )  # fmt: skip
    history.loss = result.losses
    if not all(math.isfinite(v) for v in history.loss):
        raise ModelError(
            f"maestro: training loss became non-finite at epoch {(len(history.loss) - 1) // per_epoch + 1}; "
            f"lower `lr` (got {schedule.lr})"
        )
    return history

"""State shared by the backprop and MeZO loops: schedule, batches, progress, periodic evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import Tensor, nn
from typing_extensions import Self

from compressor.context import MeanEtaColumn, ProgressLog
from compressor.training.config import TrainConfig
from compressor.training.data import TaskData
from compressor.training.losses import to_device
from compressor.training.runtime import PeakMemory, Runtime


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of `lr` at 0-based `step`: linear warm-up, then constant / linear / cosine to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "linear":
        return max(0.0, 1.0 - progress)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


@dataclass
class TrainRun:
    """Everything one call of `fit` works with, and what it records while it runs."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    data: TaskData
    loss_fn: Callable[[nn.Module, dict], Tensor]
    eval_fn: Callable[[nn.Module], dict[str, float]]
    config: TrainConfig
    ctx: object
    runtime: Runtime
    method: str
    seed: int
    identity: dict
    memory: PeakMemory
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    after_step: Callable[[int], None] | None = None
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    tokens: int = 0
    start_step: int = 0
    diverged_at: int | None = None
    _progress: Progress | None = None
    _log: ProgressLog | None = None  # progress lines when the output is not a terminal
    _task: int | None = None
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def out_dir(self) -> Path | None:
        out = getattr(self.ctx, "out_dir", None)
        return Path(out) if out is not None else None

    def meta(self) -> dict:
        """What a checkpoint or log records to judge a resume: method, identity, resolved config."""
        config = {**self.config.to_dict(), "lr": self.config.learning_rate, "seed": self.seed}
        return {"method": self.method, **self.identity, "config": config}

    def lr_at(self, step: int) -> float:
        return self.config.learning_rate * lr_factor(step, self.config)

    def batch(self, micro_index: int) -> dict[str, Tensor]:
        """This rank's micro-batch number `micro_index` (the order depends only on the seed)."""
        index = self.runtime.shard(micro_index)
        batch = self.data.train_batch(index, self.config.batch_size, self.seed)
        self.tokens += self.data.tokens_per_batch(batch)
        return to_device(batch, self.runtime.device)

    def record(self, step: int, loss: float) -> None:
        """Log the loss of finished `step` (0-based); evaluate every `eval_every` steps.
        A non-finite loss marks the run diverged: the loops stop there (see `diverged_at`)."""
        self.losses.append(loss)
        done = step + 1
        if not math.isfinite(loss):
            self.diverged_at = done
            return
        if (
            self.config.eval_every
            and done % self.config.eval_every == 0
            and done < self.config.steps
        ):
            was_training = self.model.training
            self.evals.append({"step": done, **self.eval_fn(self.model)})
            self.model.train(was_training)  # eval functions may leave the model in eval mode
        if self._log is not None:
            self._log.update(done, f"loss {loss:.4f}")
        if self._progress is not None and (
            done % self.config.log_every == 0 or done == self.config.steps
        ):
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(
                self._task,
                completed=done,
                loss=f"{loss:.4f}",
                speed=f"{self.tokens / elapsed:,.0f} tok/s",
                mem=f"{self.memory.peak_mb():,.0f} MB",
            )

    def __enter__(self) -> Self:
        self._t0 = time.perf_counter()
        if not self.runtime.is_main or getattr(self.ctx, "quiet", False):
            return self
        console = getattr(self.ctx, "console", None)
        if console is not None and not console.is_terminal:
            self._log = ProgressLog(self.method, self.config.steps, console.file)
            return self
        self._progress = Progress(
            TextColumn(f"[bold]{self.method}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[speed]}  peak {task.fields[mem]}"),
            MeanEtaColumn(),
            console=console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.method,
            total=self.config.steps,
            completed=self.start_step,
            loss="-",
            speed="-",
            mem="-",
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def decays(name: str, param: Tensor) -> bool:
    """Weight decay applies to weight matrices only: never to biases or norm (1-D) parameters."""
    lowered = name.lower()
    return param.ndim >= 2 and not lowered.endswith("bias") and "norm" not in lowered


@torch.no_grad()
def checksum(params: dict[str, Tensor]) -> float:
    """A cheap content checksum of parameter values (to detect replays onto other weights)."""
    return float(sum(p.detach().double().abs().sum().item() for p in params.values()))

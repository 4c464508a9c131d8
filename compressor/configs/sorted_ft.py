"""Sorted Fine-Tuning (SoFT / Sorted LLaMA): train every depth sub-model at once. arXiv 2309.08968.

Its config (see compressor/configs/__init__.py); the method is compressor/training/sorted_ft.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .train import TrainConfig

WEIGHTINGS = ("sum", "mean")


@dataclass(frozen=True, kw_only=True)
class SortedConfig(TrainConfig,
                   method="sorted", kind="finetune", apply="compressor.training.sorted_ft"):
    """Sorted fine-tuning of a causal LM (task "lm"). All `TrainConfig` fields apply.

    Args:
        exits: depths n (1..num_layers) of the sub-models trained together; empty = the
            default spacing (see the module docstring). The full depth is always included.
        exit_weighting: "sum" (the paper's equal-weight sum) or "mean" of the per-exit losses.
    """

    exits: tuple[int, ...] = ()
    exit_weighting: str = "sum"

    def __post_init__(self):
        super().__post_init__()
        if self.task != "lm":
            raise ConfigError(
                f"sorted: `task` must be 'lm' (next-token loss at every exit), got {self.task!r}"
            )
        if self.exit_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"sorted: `exit_weighting` must be 'sum' or 'mean', got {self.exit_weighting!r}"
            )
        if any(not isinstance(n, int) or n < 1 for n in self.exits):
            raise ConfigError(f"sorted: `exits` must be layer counts >= 1, got {list(self.exits)}")

"""Backprop fine-tuning: the `backprop` stage, full fine-tuning of the selected weights with AdamW
through `fit` (training/trainer.py).

Its config (see compressor/configs/__init__.py); the method is compressor/training/backprop.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .train import TrainConfig


@dataclass(frozen=True, kw_only=True)
class BackpropConfig(TrainConfig,
                     method="backprop", kind="finetune", apply="compressor.training.backprop"):
    """Full fine-tuning with AdamW. All `TrainConfig` fields apply; `targets` / `ignore` pick the
    linears whose weights (and biases) train; empty `targets` = every parameter of the model."""

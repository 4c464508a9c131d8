"""Backprop fine-tuning: the `backprop` stage, full fine-tuning of the selected weights with AdamW
through `fit` (training/trainer.py)."""

from __future__ import annotations

from torch import nn

from compressor.configs.backprop import BackpropConfig  # noqa: F401  (the config, declared there; re-exported)
from compressor.errors import ConfigError
from compressor.registry import register
from compressor.report.records import StageResult
from compressor.training.trainer import fit, trainable_for_targets


@register(BackpropConfig)
def apply(model: nn.Module, config: BackpropConfig, ctx) -> StageResult:
    """Fine-tune `model` in place by backpropagation."""
    if config.optimizer != "adamw":
        raise ConfigError(
            f"backprop: `optimizer` must be 'adamw', got {config.optimizer!r}; use the `mezo` stage"
        )
    result = fit(model, trainable_for_targets(model, config), config, ctx, method="backprop")
    return result.stage_result()

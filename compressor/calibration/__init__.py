"""Calibration: the block-by-block primitives (blocks.py), the per-linear input statistics
(stats.py) and the one sequential engine every calibrated method runs on (engine.py)."""

from .blocks import (
    BlockInputs,
    block_linears,
    capture_block_inputs,
    capture_linear_inputs,
    forward_batch,
    inputs_to,
    run_block,
    transformer_blocks,
)
from .engine import (
    DEFAULT_SECOND_PHASE,
    CalibrationHooks,
    CalibrationSummary,
    CompressStep,
    PhaseStep,
    calibrated_phases,
    calibration_windows,
    collect_stats,
    compress_blocks,
    compress_each,
    compress_layer,
    outside_blocks,
    split_phases,
)
from .stats import STATS_KINDS, LayerStats, StatsCollector

__all__ = [
    "DEFAULT_SECOND_PHASE",
    "STATS_KINDS",
    "BlockInputs",
    "CalibrationHooks",
    "CalibrationSummary",
    "CompressStep",
    "LayerStats",
    "PhaseStep",
    "StatsCollector",
    "block_linears",
    "calibrated_phases",
    "calibration_windows",
    "capture_block_inputs",
    "capture_linear_inputs",
    "collect_stats",
    "compress_blocks",
    "compress_each",
    "compress_layer",
    "forward_batch",
    "inputs_to",
    "outside_blocks",
    "run_block",
    "split_phases",
    "transformer_blocks",
]

"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, the data-free baseline of the low-rank family.

Keeps the r largest singular values of W itself, so it minimises ‖W − W'‖_F but knows nothing about
which input directions the model actually uses; the activation-aware methods (asvd, svd-llm,
saes-svd) exist because that weight-space error is a poor proxy for the output error ‖(W − W')X‖.
No calibration data is needed. See compressor/methods/lowrank.py for `rank` (a keep ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ._lowrank_driver import LowRankDriver, TruncatedSVD
from .lowrank import LowRankConfig


@dataclass(frozen=True, kw_only=True)
class SVDConfig(LowRankConfig):
    """Plain truncated SVD of every targeted linear (see LowRankConfig for the shared fields)."""


@register("svd", SVDConfig, kind="compress")
def apply(model: nn.Module, config: SVDConfig, ctx: Context) -> StageResult:
    """Replace every targeted linear by its rank-r truncated SVD (no calibration)."""
    return LowRankDriver(model, config, ctx, TruncatedSVD()).run()

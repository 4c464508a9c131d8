"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, the data-free baseline of the low-rank family.

Keeps the r largest singular values of W itself, so it minimises ‖W − W'‖_F but knows nothing about
which input directions the model actually uses; the activation-aware methods (asvd, svd-llm,
saes-svd) exist because that weight-space error is a poor proxy for the output error ‖(W − W')X‖.
No calibration data is needed. See compressor/methods/lowrank.py for `rank` (a keep ratio).
"""

from __future__ import annotations

from torch import nn

from ..configs.svd import SVDConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ._lowrank_driver import LowRankDriver, TruncatedSVD


@register(SVDConfig)
def apply(model: nn.Module, config: SVDConfig, ctx: Context) -> StageResult:
    """Replace every targeted linear by its rank-r truncated SVD (no calibration)."""
    return LowRankDriver(model, config, ctx, TruncatedSVD()).run()

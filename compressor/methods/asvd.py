"""ASVD: activation-aware SVD — scale input channels by their typical magnitude before truncating.

Paper: Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
Language Models", https://arxiv.org/abs/2312.05821 (reference code hahnyuan/ASVD4LLM).
METHODS.md §4.

S = diag(s) with s_j = (mean_tokens |x_j|)^α, α = 0.5 (`abs_mean`). SVD(W S) = U Σ Vᵀ and
W' = U_r Σ_r V_rᵀ S⁻¹, √Σ fused into both factors. Channels that carry large activations are
protected; the truncation is still not optimal for the output error (that is SVD-LLM's
whitening). Guard (ASVD issue #7 reports NaN below keep 0.75): scales that are zero, negative or
not finite — dead channels, empty statistics — are raised to 1e-6·max(s) (or 1 when no channel is
usable), so S⁻¹ stays finite; how many were fixed is reported per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..calibration import LayerStats
from ..configs.asvd import ASVDConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ._factors import split_singular
from ._lowrank_driver import Factors, LowRankDriver

SCALE_FLOOR = 1e-6


def activation_scales(abs_mean: Tensor, alpha: float = 0.5) -> tuple[Tensor, int]:
    """(mean |x_j| (n,), α) -> (s (n,) fp64, all > 0 and finite; how many channels were floored)."""
    scales = abs_mean.double().clamp_min(0) ** alpha
    usable = torch.isfinite(scales) & (scales > 0)
    top = scales[usable].max().item() if usable.any() else 0.0
    floor = SCALE_FLOOR * top if top > 0 else 1.0
    bad = ~torch.isfinite(scales) | (scales < floor)
    return torch.where(bad, torch.full_like(scales, floor), scales), int(bad.sum())


def asvd_factors(weight: Tensor, scales: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(W (m, n), s (n,), r) -> (u (m, r), v (r, n)) with u v = [W diag(s)]_r diag(s)⁻¹, fp64."""
    scales = scales.double()
    u, s, vh = torch.linalg.svd(weight.double() * scales[None, :], full_matrices=False)
    left, right = split_singular(u, s, vh, r)
    return left, right / scales[None, :]


@dataclass(frozen=True)
class ActivationScaledSVD:
    """ASVD's factorization for the low-rank driver: SVD of W·diag(s), s from mean |x|."""

    alpha: float
    stats_kind: ClassVar[str] = "abs_mean"

    def factorize(self, name: str, weight: Tensor, stats: LayerStats | None, r: int) -> Factors:
        assert stats is not None  # the driver keeps layers without calibration inputs dense
        scales, fixed = activation_scales(stats.abs_mean(), self.alpha)
        notes = (f"{name}: {fixed} input channels had zero/NaN activation scale; floored to keep S⁻¹ finite",)
        return Factors(*asvd_factors(weight, scales, r), info={"scales_floored": fixed},
                       notes=notes if fixed else ())


@register(ASVDConfig)
def apply(model: nn.Module, config: ASVDConfig, ctx: Context) -> StageResult:
    """Activation-scaled truncated SVD of every targeted linear, calibrated block by block."""
    return LowRankDriver(model, config, ctx, ActivationScaledSVD(config.alpha)).run()

"""SVD-LLM: truncation-aware data whitening (+ optional least-squares update of U).

Paper: Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
Model Compression", ICLR 2025, https://arxiv.org/abs/2403.07378 (reference code
AIoT-MLSys-Lab/SVD-LLM). METHODS.md §3.1.

With H = X Xᵀ/N = L Lᵀ (Cholesky, fp64) the SVD of W L = U Σ Vᵀ gives W' = U_r Σ_r V_rᵀ L⁻¹ and
‖(W − W')X‖²_F / N = Σ_{i>r} σ_i², so dropping a singular value costs exactly its square: the
truncation is optimal for the calibration output error, unlike plain SVD or ASVD. L⁻¹ is applied by
triangular solves, never formed. If H is not positive definite (dead input channels, too few
tokens) the diagonal is shifted by (−λ_min + 1e-6) and retried (×10 per retry); the shift is
reported as a note.

Update step: with V̂ = √Σ_r V_rᵀ L⁻¹ fixed, U is re-solved by least squares against the full-precision
model's outputs, U = argmin ‖U V̂ X − W X_f‖² = W (X_f Xᵀ) V̂ᵀ (V̂ H V̂ᵀ)⁻¹, from statistics only.
The reference code fits W·X on the compressed model's inputs X instead; with our sequential
whitening (H already measured on X) that target makes the update an exact no-op, so the target is
the teacher's output, which is what the update is for: absorbing the upstream compression error.
`update: auto` turns it on when rank (keep) < 0.7, as the reference recommends for ratio > 0.3;
the default is `false` because, measured, this teacher-target update hurts more than it helps:
stories260K (reports/quality_q2.md) 35.6 -> 30.4 at keep 0.8 but 85.7 -> 100.6 at 0.6 and
154 -> 292 at 0.4; SmolLM2-135M (reports/quality_q1.md) 88.5 -> 204.1 at 0.8 and 192.0 -> 480.2
at 0.6. Fitting U to the full-precision outputs is CEALC with β = 1 on U alone, and ACES caps β
at 0.43 for the same reason: saes-svd is the way to use the teacher's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..calibration import LayerStats
from ..configs.svd_llm import UPDATE_AUTO_BELOW, SVDLLMConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..numerics import cholesky_with_shift
from ..registry import register
from ..report.records import StageResult
from ._factors import least_squares_left, whitened_factors
from ._lowrank_driver import Factors, LowRankDriver


@dataclass(frozen=True)
class WhitenedSVD:
    """SVD-LLM's factorization for the low-rank driver: truncated SVD of W·L (H = L Lᵀ), then
    optionally U re-fitted to the teacher's outputs (`update`, which also streams the teacher)."""

    damping: float
    update: bool

    @property
    def stats_kind(self) -> str:
        return "hessian+cross" if self.update else "hessian"

    def factorize(self, name: str, weight: Tensor, stats: LayerStats | None, r: int) -> Factors:
        assert stats is not None  # the driver keeps layers without calibration inputs dense
        h = stats.hessian()
        chol, shift = cholesky_with_shift(h, self.damping)
        left, right, sigma = whitened_factors(weight, chol, r)
        info: dict[str, float | bool] = {"dropped_energy": _dropped_fraction(sigma, r)}
        notes = ()
        if shift:
            info["cholesky_shift"] = shift
            notes = (f"{name}: calibration Hessian not positive definite; Cholesky used shift {shift:.3g}·I",)
        if self.update:
            left = least_squares_left(weight, right, h, stats.teacher_cross())
            info["updated"] = True
        return Factors(left, right, info, notes)


def _dropped_fraction(sigma: Tensor, r: int) -> float:
    """Σ_{i>r} σ_i² / Σ σ_i²: the share of the whitened (output) energy the truncation drops."""
    energy = sigma.double().square()
    return float(energy[r:].sum() / energy.sum().clamp_min(1e-300))


@register(SVDLLMConfig)
def apply(model: nn.Module, config: SVDLLMConfig, ctx: Context) -> StageResult:
    """Whitened truncated SVD of every targeted linear, calibrated block by block."""
    return LowRankDriver(model, config, ctx, WhitenedSVD(config.damping, config.use_update())).run()

"""SAES-SVD: CEALC (cumulative-error-aware closed form) + ACES (per-layer β search).

Paper: "SAES-SVD: Self-Adaptive Suppression of Accumulated and Local Errors for SVD-based LLM
Compression", ICLR 2026, https://arxiv.org/abs/2602.03051. METHODS.md §3.2–3.3.

CEALC. X are a layer's inputs in the already-compressed model, X_f the full-precision model's
inputs for the same tokens. The objective ‖W'X − WX‖² + α‖W'X − WX_f‖² equals (up to a constant)
‖W'X − W(X + β(X_f − X))‖² with β = α/(1+α). With H = X Xᵀ/N + λI = L Lᵀ and
Δ = (X_f − X)Xᵀ/N its rank-r optimum is W' = [G(β)]_r L⁻¹, G(β) = W(H + βΔ)L⁻ᵀ = W L + β W Δ L⁻ᵀ.
β = 0 is SVD-LLM exactly (the W L term is computed the same way, so the factors are bitwise equal
when λ matches).

ACES picks β per layer to maximise the retained-energy ratio RER(β) = ‖[G(β)]_r‖²/‖G(β)‖²: with
G = G₀ + βG_d and the top-r singular subspaces of G₀ frozen (projectors P⊥, Q⊥ onto their
complements), tail(β) = ‖P⊥G(β)Q⊥‖² = aβ² + bβ + c and total(β) = ‖G(β)‖² = Aβ² + Bβ + C; the
stationary points of tail/total solve (aB − bA)β² + 2(aC − cA)β + (bC − cB) = 0. The roots inside
[beta_min, beta_max] and the two endpoints are compared and the best is kept. Freezing the
subspace drops the cross blocks P⊥G_dQ and PG_dQ⊥, which the true rank-r approximation partly
absorbs, so the approximation is first order in β; the caps keep β where it holds (reviewers:
"β caps and shrinkage"; defaults from the reproduction: [0.2, 0.428571], damping 1e-5).

Statistics (H and X_f Xᵀ) are streamed: every calibration batch runs through the original block
(teacher) and the compressed model's block (student), nothing is cached across batches. Inside a
block q, k, v, gate, up are compressed first, then o and down on the compressed first phase's
outputs (the reproduction's order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..calibration import LayerStats
from ..configs.saes_svd import SAESConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..numerics import cholesky_with_shift
from ..registry import register
from ..report.records import StageResult
from ._factors import split_singular, unwhiten
from ._lowrank_driver import Factors, LowRankDriver


def cealc_parts(weight: Tensor, chol: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(W (m, n), L (n, n), Δ (n, n)) -> (G₀ = W L, G_d = W Δ L⁻ᵀ), both (m, n) fp64."""
    w = weight.double()
    g_d = torch.linalg.solve_triangular(
        chol.T, w @ delta.double(), upper=True, left=False
    )  # Z Lᵀ = WΔ
    return w @ chol, g_d


def cealc_factors(
    g0: Tensor, g_d: Tensor, chol: Tensor, beta: float, r: int
) -> tuple[Tensor, Tensor, float]:
    """W' = [G₀ + βG_d]_r L⁻¹ as (u (m, r), v (r, n)) plus the exact RER(β) of that G."""
    target = g0 if beta == 0 else g0 + beta * g_d
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    left, right = split_singular(u, s, vh, r)
    return left, unwhiten(right, chol), retained_from_singular(s, r)


def retained_from_singular(sigma: Tensor, r: int) -> float:
    energy = sigma.double().square()
    return float(energy[:r].sum() / energy.sum().clamp_min(1e-300))


def retained_energy_ratio(target: Tensor, r: int) -> float:
    """RER = ‖[G]_r‖²_F / ‖G‖²_F (exact, by SVD)."""
    return retained_from_singular(torch.linalg.svdvals(target.double()), r)


def aces_coefficients(g0: Tensor, g_d: Tensor, r: int) -> tuple[float, ...]:
    """(a, b, c, A, B, C) of tail(β) = aβ²+bβ+c and total(β) = Aβ²+Bβ+C (G₀'s top-r subspace frozen)."""
    u, s, vh = torch.linalg.svd(g0, full_matrices=False)
    u_r, v_r = u[:, :r], vh[:r].T
    # P⊥ G_d Q⊥ = G_d − U(UᵀG_d) − (G_d V)Vᵀ + U(UᵀG_d V)Vᵀ
    left = u_r.T @ g_d  # (r, n)
    d_tail = g_d - u_r @ left - (g_d @ v_r) @ v_r.T + u_r @ (left @ v_r) @ v_r.T
    g0_tail = (u[:, r:] * s[r:]) @ vh[r:]  # already inside P⊥ · Q⊥
    a = float(d_tail.square().sum())
    b = 2 * float((g0_tail * d_tail).sum())
    c = float(s[r:].square().sum())
    return a, b, c, float(g_d.square().sum()), 2 * float((g0 * g_d).sum()), float(s.square().sum())


def aces_beta(
    g0: Tensor, g_d: Tensor, r: int, beta_min: float, beta_max: float
) -> tuple[float, float]:
    """ACES: β ∈ [beta_min, beta_max] minimising the approximate tail/total energy ratio.

    Returns (β, approximate 1 − tail/total at β)."""
    a, b, c, big_a, big_b, big_c = aces_coefficients(g0, g_d, r)
    candidates = [beta_min, beta_max]
    q2, q1, q0 = a * big_b - b * big_a, 2 * (a * big_c - c * big_a), b * big_c - c * big_b
    scale = max(abs(q2), abs(q1), abs(q0), 1e-300)
    if abs(q2) > 1e-12 * scale:
        disc = q1 * q1 - 4 * q2 * q0
        if disc >= 0:
            root = disc**0.5
            candidates += [(-q1 + root) / (2 * q2), (-q1 - root) / (2 * q2)]
    elif abs(q1) > 1e-12 * scale:
        candidates.append(-q0 / q1)

    def ratio(beta: float) -> float:
        total = big_a * beta * beta + big_b * beta + big_c
        return (a * beta * beta + b * beta + c) / total if total > 0 else 1.0

    inside = [x for x in candidates if beta_min <= x <= beta_max]
    best = min(inside, key=ratio)
    return best, 1.0 - ratio(best)


@dataclass(frozen=True)
class CealcFactorization:
    """SAES-SVD's factorization for the low-rank driver: CEALC factors at a fixed β, or the β
    ACES picks in [beta_min, beta_max] (`beta` None), from H and the teacher cross term."""

    beta: float | None
    beta_min: float
    beta_max: float
    damping: float
    stats_kind: ClassVar[str] = "hessian+cross"

    def factorize(self, name: str, weight: Tensor, stats: LayerStats | None, r: int) -> Factors:
        assert stats is not None  # the driver keeps layers without calibration inputs dense
        h = stats.hessian()
        chol, shift = cholesky_with_shift(h, self.damping)
        g0, g_d = cealc_parts(weight, chol, stats.teacher_cross() - h)
        info: dict[str, float] = {}
        if self.beta is None:
            beta, info["rer_predicted"] = aces_beta(g0, g_d, r, self.beta_min, self.beta_max)
        else:
            beta = self.beta
        left, right, info["rer"] = cealc_factors(g0, g_d, chol, beta, r)
        info["beta"] = beta
        notes = ()
        if shift:
            info["cholesky_shift"] = shift
            notes = (f"{name}: calibration Hessian not positive definite; Cholesky used shift {shift:.3g}·I",)
        return Factors(left, right, info, notes)


@register(SAESConfig)
def apply(model: nn.Module, config: SAESConfig, ctx: Context) -> StageResult:
    """CEALC factors with an ACES-chosen (or fixed) β per layer, calibrated block by block with a
    full-precision teacher stream."""
    factorization = CealcFactorization(config.beta, config.beta_min, config.beta_max, config.damping)
    result = LowRankDriver(model, config, ctx, factorization).run()
    betas = [row["beta"] for row in result.per_module if "beta" in row]
    if betas:
        result.metrics.update(
            beta_mean=sum(betas) / len(betas),
            beta_min_chosen=min(betas),
            beta_max_chosen=max(betas),
        )
    return result

"""Pure-tensor properties of the low-rank family: rank arithmetic, SVD-LLM's truncation identity,
CEALC/ACES, the Cholesky fallback, ASVD's scale guard and WeLore's allocation."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.errors import ModelError
from compressor.methods._factors import check_finite, least_squares_left, svd_factors, whitened_factors
from compressor.methods.asvd import activation_scales, asvd_factors
from compressor.methods.lowrank import (
    LayerStats,
    LayerStatus,
    factoring_saves,
    keep_ratio_reached,
    plan_uniform,
    uniform_rank,
)
from compressor.methods.saes_svd import (
    aces_beta,
    aces_coefficients,
    cealc_factors,
    cealc_parts,
    retained_energy_ratio,
)
from compressor.methods.welore import welore_allocation
from compressor.numerics import cholesky_with_shift

# stories260K's and SmolLM2-135M's linear shapes (out, in): q, k/v (GQA), o, gate/up, down.
STORIES = [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)]
SMOLLM2 = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def layer_data(seed: int = 0, m: int = 48, n: int = 32, tokens: int = 4000, drift: float = 0.3):
    """W (m, n); anisotropic inputs X (n, N) with a decaying covariance spectrum (as real activations
    have); the 'teacher' inputs X_f = X + a structured drift + noise. All fp64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, n, dtype=torch.float64
    )
    x = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    x_f = x + drift * 0.3 * (torch.randn(n, n, generator=g, dtype=torch.float64) @ x)
    x_f = x_f + drift * 0.1 * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g, dtype=torch.float64), x, x_f


def output_error(weight, left, right, x) -> float:
    """‖(W − U V) X‖²_F / N."""
    return float(((weight - left @ right) @ x).square().sum() / x.shape[1])


# ---------------------------------------------------------------- rank arithmetic


def test_uniform_rank_is_floor_of_keep_params_over_m_plus_n():
    assert uniform_rank(64, 32, 0.6) == math.floor(0.6 * 64 * 32 / 96) == 12
    assert uniform_rank(576, 1536, 0.4) == math.floor(0.4 * 576 * 1536 / 2112) == 167
    # 0.6·64·64/128 is 19.2; exact multiples must not lose one rank to float rounding
    assert uniform_rank(100, 100, 0.6) == 30


def test_factoring_that_saves_nothing_keeps_the_layer_dense():
    assert not factoring_saves(64, 64, 32)  # 32·128 = 64·64: no saving
    assert factoring_saves(64, 64, 31)
    assert not factoring_saves(64, 64, 64)
    plans = plan_uniform({"square": (64, 64)}, 1.0)
    assert plans["square"].status is LayerStatus.KEPT_DENSE_KEEP_ONE and plans["square"].r == 64


@pytest.mark.parametrize("shapes", [STORIES, SMOLLM2])
@pytest.mark.parametrize("keep", [0.8, 0.6, 0.4, 0.2])
def test_keep_ratio_reached_within_rounding(shapes, keep):
    plans = plan_uniform({f"l{i}": s for i, s in enumerate(shapes)}, keep)
    dense, kept, reached = keep_ratio_reached(plans)
    assert dense == sum(m * n for m, n in shapes) and kept == sum(
        p.params_kept for p in plans.values()
    )
    # floor() loses less than one rank, i.e. < (m + n) parameters, per matrix
    assert keep - sum(m + n for m, n in shapes) / dense < reached <= keep


def test_non_finite_factors_are_refused_with_the_layer_name():
    check_finite("ok", torch.ones(2, 2))
    with pytest.raises(ModelError, match=r"non-finite low-rank factors for `layers.3.q_proj`"):
        check_finite("layers.3.q_proj", torch.ones(2, 2), torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------- SVD-LLM whitening


def test_svd_llm_error_equals_dropped_whitened_energy_and_beats_svd_and_asvd():
    weight, x, _ = layer_data()
    h = x @ x.T / x.shape[1]
    chol, shift = cholesky_with_shift(h)
    assert shift == 0.0
    for rank in (4, 8, 16):
        left, right, sigma = whitened_factors(weight, chol, rank)
        err = output_error(weight, left, right, x)
        dropped = float(sigma[rank:].square().sum())
        assert err == pytest.approx(dropped, rel=1e-4)
        err_svd = output_error(weight, *svd_factors(weight, rank), x)
        scales, _ = activation_scales(x.abs().mean(1))
        err_asvd = output_error(weight, *asvd_factors(weight, scales, rank), x)
        assert err <= err_svd and err <= err_asvd
        assert err < 0.8 * min(err_svd, err_asvd)  # on anisotropic inputs the gap is large


def test_layer_stats_accumulate_batches_like_one_big_product():
    _, x, x_f = layer_data(tokens=300)
    stats = LayerStats("hessian+cross")
    for start in range(0, 300, 70):
        stats.add(x[:, start : start + 70].T.float(), x_f[:, start : start + 70].T.float())
    assert stats.tokens == 300
    torch.testing.assert_close(stats.hessian(), x @ x.T / 300, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.teacher_cross(), x_f @ x.T / 300, rtol=1e-5, atol=1e-5)


def test_cholesky_falls_back_to_an_eigen_shift_on_rank_deficient_hessian():
    weight, x, _ = layer_data()
    x[5] = 0.0  # a dead input channel: H has an exactly zero row and column
    h = x @ x.T / x.shape[1]
    assert torch.linalg.cholesky_ex(h).info.item() != 0
    chol, shift = cholesky_with_shift(h)
    assert shift > 0
    left, right, _ = whitened_factors(weight, chol, 8)
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert right.abs().max() < 1e4  # the shift keeps L⁻¹ (and so V) bounded
    # still far better than plain SVD on the data it was calibrated on
    assert output_error(weight, left, right, x) < output_error(weight, *svd_factors(weight, 8), x)


def test_least_squares_update_matches_lstsq_on_the_tokens_and_lowers_the_teacher_error():
    weight, x, x_f = layer_data(drift=0.5)
    h, cross = x @ x.T / x.shape[1], x_f @ x.T / x.shape[1]
    _, right, _ = whitened_factors(weight, cholesky_with_shift(h)[0], 8)
    left = least_squares_left(weight, right, h, cross)
    # reference: min_U ‖(V X)ᵀ Uᵀ − (W X_f)ᵀ‖ solved on the token-major data itself
    expected = torch.linalg.lstsq((right @ x).T, (weight @ x_f).T).solution.T
    torch.testing.assert_close(left, expected, rtol=1e-7, atol=1e-9)
    teacher_error = lambda u: float((u @ right @ x - weight @ x_f).square().sum())
    whitened_left = whitened_factors(weight, cholesky_with_shift(h)[0], 8)[0]
    assert teacher_error(left) < teacher_error(whitened_left)


# ---------------------------------------------------------------- CEALC / ACES


def test_cealc_with_beta_zero_is_svd_llm_exactly():
    weight, x, x_f = layer_data()
    h = x @ x.T / x.shape[1] + 1e-5 * torch.eye(x.shape[0], dtype=torch.float64)
    chol, _ = cholesky_with_shift(h)
    g0, g_d = cealc_parts(weight, chol, (x_f - x) @ x.T / x.shape[1])
    left, right, _ = cealc_factors(g0, g_d, chol, 0.0, 8)
    ref_left, ref_right, _ = whitened_factors(weight, chol, 8)
    torch.testing.assert_close(left, ref_left, rtol=0, atol=1e-6)
    torch.testing.assert_close(right, ref_right, rtol=0, atol=1e-6)


def test_cealc_closed_form_is_the_optimum_of_its_objective():
    """W' = [G(β)]_r L⁻¹ minimises ‖W'X − W(X + β(X_f − X))‖² among rank-r matrices: it beats
    SVD-LLM's W' (β = 0) and random rank-r perturbations of itself on that objective."""
    weight, x, x_f = layer_data(drift=0.5)
    n = x.shape[1]
    h = x @ x.T / n
    chol, _ = cholesky_with_shift(h)
    g0, g_d = cealc_parts(weight, chol, (x_f - x) @ x.T / n)
    beta, rank = 0.4, 8
    target = weight @ (x + beta * (x_f - x))
    objective = lambda left, right: float((left @ right @ x - target).square().sum() / n)
    left, right, _ = cealc_factors(g0, g_d, chol, beta, rank)
    best = objective(left, right)
    assert best < objective(*cealc_factors(g0, g_d, chol, 0.0, rank)[:2])
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        noise = 1e-3 * torch.randn(left.shape, generator=g, dtype=torch.float64)
        assert best <= objective(left + noise, right)


def test_aces_quadratics_are_the_projected_energies():
    weight, x, x_f = layer_data()
    chol, _ = cholesky_with_shift(x @ x.T / x.shape[1])
    g0, g_d = cealc_parts(weight, chol, (x_f - x) @ x.T / x.shape[1])
    rank = 8
    a, b, c, big_a, big_b, big_c = aces_coefficients(g0, g_d, rank)
    u, _, vh = torch.linalg.svd(g0, full_matrices=False)
    p_perp = torch.eye(g0.shape[0], dtype=torch.float64) - u[:, :rank] @ u[:, :rank].T
    q_perp = torch.eye(g0.shape[1], dtype=torch.float64) - vh[:rank].T @ vh[:rank]
    for beta in (0.0, 0.3, 0.9):
        g = g0 + beta * g_d
        assert a * beta**2 + b * beta + c == pytest.approx(
            float((p_perp @ g @ q_perp).square().sum()), rel=1e-9
        )
        assert big_a * beta**2 + big_b * beta + big_c == pytest.approx(
            float(g.square().sum()), rel=1e-9
        )


def test_aces_finds_an_interior_optimum_from_the_stationary_point():
    """G_d cancels G₀'s tail at β ≈ 0.5: the stationary point, not an endpoint, must win."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 30, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    s = torch.linspace(10, 1, 30, dtype=torch.float64)
    g0 = (u * s) @ v.T
    tail = (u[:, 6:] * s[6:]) @ v[:, 6:].T
    g_d = -2.0 * tail + 0.05 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    beta, _ = aces_beta(g0, g_d, 6, 0.0, 0.95)
    grid = torch.linspace(0, 0.95, 96).tolist()
    exact = [retained_energy_ratio(g0 + t * g_d, 6) for t in grid]
    assert 0.3 < beta < 0.7
    assert retained_energy_ratio(g0 + beta * g_d, 6) >= max(exact) - 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_aces_beta_maximises_retained_energy_within_the_approximation(seed):
    """ACES' β vs a brute-force grid of the EXACT RER(β) on realistic statistics, default caps.

    The fixed-subspace quadratic ignores how G's top-r subspace rotates with β (the P⊥G_dQ and
    PG_dQ⊥ blocks enter the exact tail only at second order), so it over-estimates the tail and its
    minimiser can miss the exact one. Measured over 12 seeds: gap ≤ 5.9e-4 in RER inside
    [0.2, 0.428571] (RER varies by up to 4e-3 across that interval); on a wide [0, 0.95] the gap
    grows to 4e-3 — which is why the caps exist."""
    weight, x, x_f = layer_data(seed)
    chol, _ = cholesky_with_shift(
        x @ x.T / x.shape[1] + 1e-5 * torch.eye(x.shape[0], dtype=torch.float64)
    )
    g0, g_d = cealc_parts(weight, chol, (x_f - x) @ x.T / x.shape[1])
    beta, predicted = aces_beta(g0, g_d, 8, 0.2, 0.428571)
    assert 0.2 <= beta <= 0.428571
    chosen = retained_energy_ratio(g0 + beta * g_d, 8)
    grid = max(
        retained_energy_ratio(g0 + t * g_d, 8) for t in torch.linspace(0.2, 0.428571, 41).tolist()
    )
    assert chosen >= grid - 1e-3
    assert predicted <= chosen + 1e-9  # frozen subspace ⇒ the predicted tail is an over-estimate


# ---------------------------------------------------------------- ASVD


def test_asvd_scales_floor_zero_and_nan_channels():
    scales, fixed = activation_scales(torch.tensor([4.0, 0.0, float("nan"), 1.0]), alpha=0.5)
    assert fixed == 2
    assert torch.isfinite(scales).all() and (scales > 0).all()
    torch.testing.assert_close(scales[[0, 3]], torch.tensor([2.0, 1.0], dtype=torch.float64))
    empty, fixed = activation_scales(torch.zeros(3))
    assert fixed == 3 and torch.equal(empty, torch.ones(3, dtype=torch.float64))


def test_asvd_with_alpha_zero_is_plain_svd_and_protects_loud_channels_otherwise():
    weight, x, _ = layer_data()
    ones, _ = activation_scales(x.abs().mean(1), alpha=0.0)
    torch.testing.assert_close(
        torch.cat([t.flatten() for t in asvd_factors(weight, ones, 8)]).abs(),
        torch.cat([t.flatten() for t in svd_factors(weight, 8)]).abs(),
    )
    scales, _ = activation_scales(x.abs().mean(1), alpha=0.5)
    assert output_error(weight, *asvd_factors(weight, scales, 8), x) < output_error(
        weight, *svd_factors(weight, 8), x
    )


# ---------------------------------------------------------------- WeLore allocation


def _spectra():
    heavy = torch.logspace(1, -3, 32)  # heavy tail: most values near 0 after min-max normalisation
    flat = torch.linspace(2, 1, 32)  # flat: evenly spread in [0, 1]
    return {"heavy": heavy, "flat": flat}, {"heavy": (64, 32), "flat": (64, 32)}


def test_welore_keep_one_is_the_identity():
    spectra, shapes = _spectra()
    plans, tau = welore_allocation(spectra, shapes, 1.0, 0.4999)
    assert tau == 0.0 and all(not p.factored for p in plans.values())


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5, 0.3])
def test_welore_gives_heavy_tails_lower_rank_and_stays_within_budget(keep):
    spectra, shapes = _spectra()
    plans, _ = welore_allocation(spectra, shapes, keep, 0.0)
    _, kept, reached = keep_ratio_reached(plans)
    assert reached <= keep
    ranks = {n: p.r for n, p in plans.items()}
    assert ranks["heavy"] < ranks["flat"]
    # smallest τ within budget: the next σ̂ step (one more rank somewhere) would exceed it
    one_rank = 64 + 32
    assert kept > keep * 2 * 64 * 32 - 2 * one_rank or reached == pytest.approx(keep, abs=0.2)


def test_welore_min_ratio_splits_lrc_from_dense_n_lrc():
    spectra, shapes = _spectra()
    plans, _ = welore_allocation(spectra, shapes, 0.7, 0.4999)
    assert (
        plans["heavy"].factored and plans["heavy"].r < 16
    )  # > 50 % of its rank removed
    assert plans["flat"].status is LayerStatus.KEPT_DENSE_N_LRC and plans["flat"].r == 32

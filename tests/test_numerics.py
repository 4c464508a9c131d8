"""compressor.numerics: one Cholesky rule for every method that whitens or inverts a Hessian.

A positive definite H factors exactly as torch's Cholesky does (no shift); otherwise the diagonal
is shifted by max(-λ_min, 0) + 1e-6 (×10 per retry) and every caller gets a usable factor."""

from __future__ import annotations

import pytest
import torch

from compressor import numerics
from compressor.errors import ModelError
from compressor.methods._dsformer_factor import SparsePattern, damp_hessian, init_dictionary
from compressor.methods._maestro_layer import ordered_factors
from compressor.methods._sparsegpt import inverse_hessian_factor
from compressor.numerics import SHIFT_EPS, add_relative_ridge, cholesky_lower, cholesky_with_shift


def gram(dead: int | None = None, n: int = 12, tokens: int = 200) -> torch.Tensor:
    x = torch.randn(n, tokens, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if dead is not None:
        x[dead] = 0.0  # a dead input channel: an exactly zero row and column, λ_min = 0
    return x @ x.T / tokens


def test_a_positive_definite_matrix_factors_exactly_as_torch_with_no_shift():
    h = gram()
    factor, shift = cholesky_lower(h)
    assert shift == 0.0
    assert torch.equal(factor, torch.linalg.cholesky(h))
    ridged = cholesky_with_shift(h, damping=0.5)[0]
    assert torch.equal(ridged, torch.linalg.cholesky(h + 0.5 * torch.eye(12, dtype=h.dtype)))


def test_a_singular_matrix_is_shifted_by_minus_lambda_min_plus_eps():
    h = gram(dead=3)
    assert torch.linalg.cholesky_ex(h).info.item() != 0
    factor, shift = cholesky_lower(h)
    lam_min = torch.linalg.eigvalsh(h)[0].item()
    assert shift == pytest.approx(max(-lam_min, 0.0) + SHIFT_EPS, rel=1e-12)
    torch.testing.assert_close(factor @ factor.T, h + shift * torch.eye(12, dtype=h.dtype))


def test_an_indefinite_matrix_is_shifted_past_its_negative_eigenvalue():
    h = gram() - 0.5 * torch.eye(12, dtype=torch.float64) * gram().diagonal().max()
    lam_min = torch.linalg.eigvalsh(h)[0].item()
    assert lam_min < 0
    factor, shift = cholesky_lower(h)
    assert shift == pytest.approx(-lam_min + SHIFT_EPS)
    assert torch.isfinite(factor).all() and factor.diagonal().min() > 0


def test_a_vanishing_pivot_counts_as_a_failure():
    """Cholesky succeeds on diag(1, 1e-14) but L⁻¹ would blow up by 1e7: shift instead."""
    h = torch.diag(torch.tensor([1.0, 1e-14], dtype=torch.float64))
    assert torch.linalg.cholesky_ex(h).info.item() == 0
    factor, shift = cholesky_lower(h)
    assert shift == pytest.approx(SHIFT_EPS)
    assert factor[1, 1] ** 2 == pytest.approx(1e-14 + SHIFT_EPS)


def test_a_non_finite_matrix_raises_a_model_error():
    h = gram()
    h[2, 2] = float("nan")
    with pytest.raises(ModelError, match="non-finite entries"):
        cholesky_with_shift(h)


def test_the_shift_grows_tenfold_per_retry_then_gives_up(monkeypatch):
    tried = []

    def never(h):
        tried.append(h)
        return h, False

    monkeypatch.setattr(numerics, "_try_cholesky", never)
    with pytest.raises(ModelError, match=r"failed even with shift 10;"):
        cholesky_lower(gram(dead=3))
    shifts = [(t - gram(dead=3))[0, 0].item() for t in tried[1:]]
    assert len(shifts) == numerics.SHIFT_RETRIES
    assert shifts == pytest.approx([SHIFT_EPS * 10**i for i in range(numerics.SHIFT_RETRIES)], rel=1e-6)


def test_the_relative_ridge_is_a_fraction_of_the_mean_diagonal():
    h = gram()
    torch.testing.assert_close(add_relative_ridge(h, 0.01), h + 0.01 * h.diagonal().mean() * torch.eye(12, dtype=h.dtype),
                               rtol=0, atol=0)
    assert torch.equal(add_relative_ridge(torch.zeros(3, 3), 1.0), 1e-12 * torch.eye(3))


def test_every_method_gets_a_usable_factor_of_an_indefinite_hessian():
    """maestro's and dsformer's ridges do not make this H definite, sparsegpt's dampening neither
    (it used to raise): all three take the shared eigen-shift and stay finite."""
    h = gram() - 0.5 * torch.eye(12, dtype=torch.float64) * gram().diagonal().max()
    weight = torch.randn(6, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, v = ordered_factors(weight, h, rank=4)
    d = init_dictionary(weight, 4, damp_hessian(h), SparsePattern(n=2, m=4))
    upper, dead = inverse_hessian_factor(h, dampening=0.01)
    for tensor in (u, v, d, upper):
        assert torch.isfinite(tensor).all()
    assert not dead.any()

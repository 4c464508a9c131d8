"""Numerical helpers shared by the methods: the Cholesky factor of a calibration Hessian.

Every method that factors H = X Xᵀ (svd-llm, saes-svd, the aware rank allocation, dsformer's and
maestro's whitened initialisations, sparsegpt) uses `cholesky_lower`, so they share one rule for
a matrix that does not factor:

* H is factored in fp64 with `cholesky_ex`. The factor is accepted when the call succeeded, L is
  finite and its smallest pivot² exceeds 1e-12 · max diag(H): a factorisation that technically
  succeeds with a vanishing pivot would make L⁻¹ (a whitened right factor, an OBS update) explode.
* Otherwise the diagonal is shifted by max(−λ_min, 0) + 1e-6 (the eigen-shift of the SVD-LLM
  reference code, METHODS.md §3.1) and the factorisation retried, the shift ×10 per retry, up to
  8 retries; then a ModelError names the fix (a non-finite H fails at once). The shift is
  returned so a method can report it.

The shift's 1e-6 is absolute, as the reference code and METHODS.md have it, rather than relative to
H's scale: it keeps the shifts that svd-llm / saes-svd report unchanged, and the retries grow it
where H's scale needs more. A method that wants a ridge proportional to H's scale adds it first
(`add_relative_ridge`); the training losses live in `compressor.training.losses`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ModelError

SHIFT_EPS = 1e-6  # added to -λ_min when H is not positive definite (METHODS.md §3.1)
SHIFT_RETRIES = 8  # each retry multiplies the shift by 10
MIN_PIVOT_RATIO = 1e-12  # smallest accepted pivot² relative to max diag(H)


def cholesky_lower(h: Tensor) -> tuple[Tensor, float]:
    """Lower L (n, n) fp64 with L Lᵀ = H + shift·I; returns (L, shift), shift 0.0 when H factors."""
    h = h.double()
    factor, ok = _try_cholesky(h)
    if ok:
        return factor, 0.0
    if not torch.isfinite(h).all():  # no shift helps; eigvalsh would fail with a raw LinAlgError
        raise ModelError(
            "the calibration Hessian has non-finite entries (NaN/Inf activations); check the "
            "model's weights and the calibration data"
        )
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam_min = torch.linalg.eigvalsh(h)[0].item()
    shift = max(-lam_min, 0.0) + SHIFT_EPS
    for _ in range(SHIFT_RETRIES):
        factor, ok = _try_cholesky(h + shift * eye)
        if ok:
            return factor, shift
        shift *= 10
    raise ModelError(
        f"Cholesky of the calibration Hessian failed even with shift {shift / 10:.3g}; "
        "use more calibration windows or add the layer to `ignore`"
    )


def cholesky_with_shift(hessian: Tensor, damping: float = 0.0) -> tuple[Tensor, float]:
    """`cholesky_lower` of H + damping·I (an absolute ridge, 0 = none); returns (L, shift)."""
    h = hessian.double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return cholesky_lower(h + damping * eye)


def add_relative_ridge(h: Tensor, fraction: float) -> Tensor:
    """H + fraction · mean(diag H) · I (the mean floored at 1e-12, so a zero H gets a tiny ridge)."""
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    return h + fraction * h.diagonal().mean().clamp_min(1e-12) * eye


def _try_cholesky(h: Tensor) -> tuple[Tensor, bool]:
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0 or not torch.isfinite(factor).all():
        return factor, False
    pivots = factor.diagonal()
    return factor, bool(
        (pivots.square().min() > MIN_PIVOT_RATIO * h.diagonal().max().clamp_min(1e-300)).item()
    )

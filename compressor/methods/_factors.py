"""The low-rank family's factorizations, pure maths shared by its methods (svd, asvd, svd-llm,
saes-svd, welore): √Σ split into both factors, plain truncated SVD, SVD-LLM's whitened SVD and its
un-whitening, the least-squares update of U, and the finiteness check before installing. Registers
no method, so a method building on another's maths imports only this."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ModelError


def split_singular(u: Tensor, s: Tensor, vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Fuse √Σ into both factors: (u (m, k), s (k,), vh (k, n)) -> (U_r√Σ_r (m, r), √Σ_r V_rᵀ (r, n))."""
    root = s[:r].clamp_min(0).sqrt()
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


def check_finite(name: str, *tensors: Tensor) -> None:
    """Refuse to install NaN/inf factors: a silent NaN would poison every later block."""
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ModelError(
                f"non-finite low-rank factors for `{name}` (calibration statistics are degenerate); "
                "use more calibration windows, or add the layer to `ignore`"
            )


def svd_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation of W (m, n) in Frobenius norm -> (u (m, r), v (r, n)), fp64.

    √Σ is fused into both factors so they have comparable scales (as SVD-LLM and ASVD do).
    """
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return split_singular(u, s, vh, r)


def whitened_factors(weight: Tensor, chol: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of W L, truncated: (W (m, n), L (n, n), r) -> (u (m, r), v (r, n), σ (min(m, n),)).

    u v = U_r Σ_r V_rᵀ L⁻¹; σ are all singular values of W L (σ_{>r}² is the dropped output error).
    """
    u, s, vh = torch.linalg.svd(weight.double() @ chol, full_matrices=False)
    left, right = split_singular(u, s, vh, r)
    return left, unwhiten(right, chol), s


def unwhiten(right: Tensor, chol: Tensor) -> Tensor:
    """right L⁻¹ (r, n) by a triangular solve of Z L = right (no explicit inverse)."""
    return torch.linalg.solve_triangular(chol, right, upper=False, left=False)


def least_squares_left(weight: Tensor, right: Tensor, hessian: Tensor, cross: Tensor) -> Tensor:
    """U (m, r) = argmin ‖U V̂ X − W X_f‖² = W C V̂ᵀ (V̂ H V̂ᵀ)⁻¹ with C = X_f Xᵀ/N, H = X Xᵀ/N."""
    w, v = weight.double(), right.double()
    gram = v @ hessian.double() @ v.T  # (r, r)
    rhs = w @ cross.double() @ v.T  # (m, r)
    solution, info = torch.linalg.solve_ex(gram, rhs.T)
    if info.item() != 0 or not torch.isfinite(solution).all():
        solution = torch.linalg.lstsq(gram, rhs.T).solution
    return solution.T

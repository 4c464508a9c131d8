"""Pure tensor maths of the DSFormer dense x sparse factorization W ~ D @ S.

Shapes: W is (out, in), D is (out, k) dense, S is (k, in) with a per-column sparsity pattern:
`N:M` keeps exactly N of every M consecutive entries along k in each column (hardware friendly,
packable with `compressor.kernels.dispatch.pack_nm(S.T)`), `unstructured` keeps the s largest entries of each
column. Everything here is tensors in, tensors out; `dsformer.py` does the wiring.

The fit minimises the (optionally whitened) reconstruction error

    f(D, S) = tr((W - D S) H (W - D S)^T) = ||(W - D S) X||_F^2      with H = X X^T,

by alternating (a) sparse coding of S, then (b) the closed-form least-squares update of D.
Sparse coding starts from the unconstrained least-squares S* (in units of unit-norm atoms) and
chooses the support either by SparseGPT's rule (`coding="sparsegpt"`, N:M only: sweep the input
columns of S* left to right against H, choose each column's N-of-M atoms by magnitude as it is
reached, and fold the removed values into the later columns with the OBS update over H⁻¹; see
_sparsegpt.py) or by the top-N-of-M projection of S* (`coding="projection"`); then the values on
that support are refined by masked preconditioned conjugate gradient on f (the columns of S are
coupled through H). With H = None the objective is the plain ||W - D S||_F^2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kernels.dispatch import nm_index_bits
from ..numerics import add_relative_ridge, cholesky_lower

# S's pattern lives below both this module and SparseGPT's solver (which parses it too); dsformer,
# prune and the tests import it from here.
from ._sparse_pattern import SparsePattern, nm_column_mask, parse_pattern  # noqa: F401
from ._sparsegpt import sparsegpt_prune

_DAMP = 1e-2  # relative ridge on H (fraction of its mean diagonal), as GPTQ-style solvers use


# -- storage accounting ------------------------------------------------------------------------


def index_bits_per_value(pattern: SparsePattern, k: int) -> int:
    """Bits of index metadata the checkpoint stores per value of S.

    N:M: the position inside the group, bit-packed by `compressor.kernels.dispatch.compress_nm_indices`
    (`nm_index_bits(M)`: 2 bits for 2:4, 4 bits for M = 8 or 16). Unstructured: the row id in k,
    stored as uint8 when k <= 256 and int16 above.
    """
    if pattern.structured:
        return nm_index_bits(pattern.m)
    return 8 if k <= 256 else 16


def dense_sparse_bytes(
    out_f: int, in_f: int, k: int, pattern: SparsePattern, value_bytes: int
) -> dict[str, float]:
    """Stored bytes of D (out, k) plus the values and index metadata of S (k, in); bias excluded."""
    nnz = in_f * pattern.nnz_per_column(k)
    meta = math.ceil(nnz * index_bits_per_value(pattern, k) / 8)
    return {
        "d_bytes": out_f * k * value_bytes,
        "s_value_bytes": nnz * value_bytes,
        "s_index_bytes": meta,
        "total_bytes": out_f * k * value_bytes + nnz * value_bytes + meta,
    }


def solve_inner_dim(
    out_f: int, in_f: int, keep: float, pattern: SparsePattern, value_bytes: int
) -> int:
    """Largest k (a multiple of M for N:M) whose stored bytes are <= keep * dense bytes.

    May return 0 or a k above min(out, in): the caller reports those with the layer name.
    """
    budget = keep * out_f * in_f * value_bytes
    step = pattern.m if pattern.structured else 1
    per_step = dense_sparse_bytes(out_f, in_f, step, pattern, value_bytes)["total_bytes"]
    k = int(budget // per_step) * step + step
    # bytes are (nearly) linear in k; walk down past rounding of the packed index bytes
    while (
        k > 0 and dense_sparse_bytes(out_f, in_f, k, pattern, value_bytes)["total_bytes"] > budget
    ):
        k -= step
    return k


# -- fitting -----------------------------------------------------------------------------------


def damp_hessian(h: Tensor | None, damp: float = _DAMP) -> Tensor | None:
    """H + damp * mean(diag H) * I in fp64 (None stays None: the plain objective)."""
    if h is None:
        return None
    return add_relative_ridge(h.double(), damp)


def whitened_error(w: Tensor, d: Tensor, s: Tensor, h: Tensor | None) -> float:
    """Relative error tr(E H E^T) / tr(W H W^T) with E = W - D S (plain Frobenius if h is None)."""
    e = w - d.to(w.dtype) @ s.to(w.dtype)
    if h is None:
        return float(e.square().sum() / w.square().sum().clamp_min(1e-30))
    h = h.to(w.dtype)
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def interleave_atoms(k: int, m: int) -> Tensor:
    """Permutation putting atoms i, i + k/m, i + 2k/m, ... into one group of m.

    The SVD sorts atoms by energy; with sorted order every N:M group would hold atoms of equal
    importance and each column would lose half of its strongest atoms. Interleaving gives every
    group one atom of each energy tier, so a column can keep all of its top tiers.
    """
    return torch.arange(k).reshape(m, k // m).T.reshape(-1)


def init_dictionary(w: Tensor, k: int, h: Tensor | None, pattern: SparsePattern) -> Tensor:
    """D0 (out, k): the top-k left singular vectors of W L (whitened) or W, scaled by sqrt(sigma)."""
    w64 = w.double()
    target = w64 if h is None else w64 @ cholesky_lower(h)[0]
    u, sig, _ = torch.linalg.svd(target, full_matrices=False)
    d = u[:, :k] * sig[:k].sqrt()
    if pattern.structured:
        d = d[:, interleave_atoms(k, pattern.m)]
    return d


def _apply_normal(g: Tensor, s: Tensor, h: Tensor | None) -> Tensor:
    """The Hessian operator of f on S: G S H (G = D^T D); G S when h is None."""
    gs = g @ s
    return gs if h is None else gs @ h


def refine_on_support(
    w: Tensor, d: Tensor, s0: Tensor, mask: Tensor, h: Tensor | None, iters: int
) -> Tensor:
    """Minimise f over S restricted to `mask` by Jacobi-preconditioned conjugate gradient.

    w (out, in), d (out, k), s0/mask (k, in), h (in, in) fp64 or None. Starts from s0 * mask.
    """
    g = d.T @ d
    rhs = d.T @ w if h is None else d.T @ w @ h
    diag = g.diagonal()[:, None] * (1.0 if h is None else h.diagonal()[None, :])
    precond = mask / diag.clamp_min(1e-30)
    s = s0 * mask
    r = (rhs - _apply_normal(g, s, h)) * mask
    z = r * precond
    p, rz = z, (r * z).sum()
    for _ in range(iters):
        ap = _apply_normal(g, p, h) * mask
        alpha = rz / (p * ap).sum().clamp_min(1e-30)
        s = s + alpha * p
        r = r - alpha * ap
        z = r * precond
        rz_new = (r * z).sum()
        if rz_new <= 1e-24 * rhs.square().sum():
            break
        p, rz = z + (rz_new / rz) * p, rz_new
    return s


def update_dictionary(w: Tensor, s: Tensor, h: Tensor | None) -> Tensor:
    """Least-squares D = W H S^T (S H S^T)^-1 (ridge-stabilised); plain W S^T (S S^T)^-1 if h None."""
    sh = s if h is None else s @ h
    gram = sh @ s.T
    gram = gram + 1e-6 * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(
        len(gram), dtype=gram.dtype
    )
    return torch.linalg.solve(gram, (w @ sh.T).T).T


def sparse_code(
    w: Tensor,
    d: Tensor,
    h: Tensor | None,
    pattern: SparsePattern,
    cg_iters: int,
    coding: str = "sparsegpt",
):
    """One S step: a support (see the module docstring for `coding`), values refined on it."""
    norms = d.norm(dim=0).clamp_min(1e-30)
    d_unit = (
        d / norms
    )  # compare |S| in units of unit atoms, so atom scale does not bias the support
    s_ls = torch.linalg.lstsq(d_unit, w).solution
    if coding == "sparsegpt" and pattern.structured:
        s_start, mask = sparsegpt_code(s_ls, h, pattern)
    else:
        s_start, mask = s_ls, pattern.mask(s_ls)
    s = refine_on_support(w, d_unit, s_start, mask, h, cg_iters)
    return d_unit, s, mask


def sparsegpt_code(s_ls: Tensor, h: Tensor | None, pattern: SparsePattern) -> tuple[Tensor, Tensor]:
    """SparseGPT on S* (k, in) against the (already damped) H: N of every M atoms per column.

    Each row of S* is one atom's input weights; with unit-norm atoms the error of a row costs
    ||(s - ŝ) X||², so the rows share the input Hessian H as a layer's rows do in SparseGPT.
    (The cross terms between non-orthogonal atoms are left to the refinement that follows.)
    """
    hessian = torch.eye(s_ls.shape[1], dtype=s_ls.dtype) if h is None else h
    return sparsegpt_prune(
        s_ls, hessian, pattern=pattern.describe(), dampening=0.0, nm_axis="out"
    )


def fit_dense_sparse(
    weight: Tensor,
    k: int,
    pattern: SparsePattern,
    h: Tensor | None = None,
    iters: int = 4,
    cg_iters: int = 10,
    coding: str = "sparsegpt",
) -> tuple[Tensor, Tensor, list[float]]:
    """Alternating dense x sparse fit of `weight` (out, in) on the whitened objective.

    Returns D (out, k), S (k, in) in weight's dtype with S obeying `pattern` exactly, and the
    relative objective after every half step (S step, D step); the best iterate is returned.
    """
    # fp64 throughout: in fp32, rounding noise (which differs between BLAS code paths) flips
    # near-tied N:M choices, and the flips compound through the sequential calibration, so runs
    # would not be reproducible.
    hd = damp_hessian(h)
    d = init_dictionary(weight, k, hd, pattern)
    w = weight.detach().double()
    best, history = None, []
    for _ in range(max(1, iters)):
        d, s, mask = sparse_code(w, d, hd, pattern, cg_iters, coding)
        err = whitened_error(w, d, s, hd)
        history.append(err)
        if best is None or err < best[0]:
            best = (err, d, s * mask)
        d = update_dictionary(w, s * mask, hd)
        err = whitened_error(w, d, s * mask, hd)
        history.append(err)
        if err < best[0]:
            best = (err, d, s * mask)
    _, d, s = best
    return d.to(weight.dtype), s.to(weight.dtype), history

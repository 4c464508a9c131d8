"""Pure pieces of Maestro (LoD, ordered-dropout low rank): the trainable factored layer, the
hierarchical group lasso, rank importance, progressive shrinking, the single-layer sampler and
budgeted truncation. `maestro.py` wires them into a stage; `_maestro_train.py` runs the loop.

Orientation follows `compressor.layers.LowRankLinear`: W = U V with U (out, r) and V (r, in);
rank i is the pair (column i of U, row i of V).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..numerics import add_relative_ridge, cholesky_lower


def ordered_factors(
    weight: Tensor, h: Tensor | None = None, rank: int | None = None
) -> tuple[Tensor, Tensor]:
    """Ordered factors of W (out, in) with sqrt(sigma) fused into both sides, in fp64.

    h None: SVD of W, U = U_svd sqrt(S), V = sqrt(S) V_svd^T (Maestro's decompose_linear).
    h = X X^T (in, in): SVD of W L (H = L L^T), so the ordering follows the output energy on the
    calibration data: U = U' sqrt(S), V = sqrt(S) Q^T L^-1. Either way U V = W at full rank.
    Returns u (out, r), v (r, in) with r = rank or min(out, in).
    """
    w = weight.detach().double()
    if h is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        l_inv_t = None
    else:
        chol = cholesky_lower(add_relative_ridge(h.double(), 1e-6))[0]
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        l_inv_t = chol
    r = len(s) if rank is None else rank
    root = s[:r].sqrt()
    v = root[:, None] * vh[:r]
    if l_inv_t is not None:  # V <- V L^-1 via a triangular solve (never form the inverse)
        v = torch.linalg.solve_triangular(l_inv_t, v, upper=False, left=False)
    return u[:, :r] * root, v


def tail_norms(sq_norms: Tensor) -> Tensor:
    """Hierarchical norms ||x_{i:}||_h = sqrt(sum_{j>=i} sq_norms[j]) of per-rank squared norms (r,).

    A tiny epsilon keeps the gradient of sqrt finite once a tail reaches exactly zero.
    """
    return (sq_norms.flip(0).cumsum(0).flip(0).clamp_min(0) + 1e-20).sqrt()


def group_lasso(u: Tensor, v: Tensor) -> Tensor:
    """Maestro's hierarchical group lasso sum_i ||v_{i:}||_h + ||u_{:i}||_h (a differentiable scalar).

    u (out, r), v (r, in). Rank i's term covers every rank >= i, so the last ranks sit in the most
    groups and are driven to zero first: this is what makes the ordering learnable.
    """
    return (tail_norms(v.square().sum(1)) + tail_norms(u.square().sum(0))).sum()


def rank_importance(u: Tensor, v: Tensor, v_scale: Tensor | None = None) -> Tensor:
    """importance_i = ||v_{i:}||_h * ||u_{:i}||_h (r,); non-increasing in i by construction.

    v_scale (r,): per-rank factor on the norm of v's rows (see `output_metric_scale`); None = 1.
    """
    with torch.no_grad():
        v_sq = v.square().sum(1)
        if v_scale is not None:
            v_sq = v_sq * v_scale.to(v_sq.dtype).square()
        return tail_norms(v_sq) * tail_norms(u.square().sum(0))


def output_metric_scale(v: Tensor, h: Tensor) -> Tensor:
    """Per rank, ||v_i L|| / ||v_i|| with H = L Lᵀ (the size of rank i's input on the calibration
    data), normalised so the total of ||v_i||² is unchanged.

    After the whitened init V = sqrt(S) Qᵀ L⁻¹, the plain norm ||v_i|| mixes the whitened singular
    value with ||L⁻ᵀ q_i||, which is large for directions the data barely excites: importance from
    plain norms then ranks near-silent directions first and the budget goes to them. Measured in
    the calibration metric, ||v_i L|| = sqrt(s_i) and importance follows the output energy.
    """
    v64 = v.detach().double()
    plain = v64.square().sum(1)
    metric = ((v64 @ h.double()) * v64).sum(1).clamp_min(0)
    scale = (metric / plain.clamp_min(1e-300)).sqrt()
    total = (plain * scale.square()).sum().clamp_min(1e-300)
    return (scale * (plain.sum() / total).sqrt()).to(v.dtype)


def kept_rank(importance: Tensor, threshold: float) -> int:
    """Progressive shrinking: the number of ranks whose importance is >= threshold.

    Importance is non-increasing, so the surviving ranks are always a prefix.
    """
    return int((importance >= threshold).sum())


class MaestroLinear(nn.Module):
    """Training-time factored linear y = ((x V[:w]^T) U[:, :w]^T) + b.

    `rank` is the active rank (shrinking lowers it); `width` (None = full) truncates the forward
    pass to the first `width` active ranks, which is ordered dropout. Parameters keep their
    initial size while training so the optimizer state stays aligned; `factors()` slices them.
    """

    def __init__(
        self, u: Tensor, v: Tensor, bias: Tensor | None, v_scale: Tensor | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = v.shape[1], u.shape[0]
        self.u = nn.Parameter(u.clone())
        self.v = nn.Parameter(v.clone())
        # the metric importance measures v's rows in (`output_metric_scale`); fixed at init
        scale = None if v_scale is None else v_scale.detach().clone()
        self.register_buffer("v_scale", scale, persistent=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.rank = u.shape[1]
        self.width: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.rank if self.width is None else min(self.width, self.rank)
        return F.linear(F.linear(x, self.v[:w]), self.u[:, :w], self.bias)

    # Like the reference code, the penalty and the importance span every rank, cut ones included:
    # cut ranks keep shrinking, and shrinking twice with one threshold cuts nothing more.
    def group_lasso(self) -> Tensor:
        return group_lasso(self.u, self.v)

    def importance(self) -> Tensor:
        return rank_importance(self.u, self.v, self.v_scale)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.u.detach()[:, : self.rank], self.v.detach()[: self.rank]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SingleLayerSampler:
    """Maestro's across-layers sampler: every (layer, width j) pair, j = 1..rank, shuffled.

    Each training step takes the next pair: only that one layer is truncated, all others run at
    full width. When the list is exhausted it is reshuffled; `rebuild` after shrinking.
    """

    def __init__(self, ranks: dict[str, int], seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self.rebuild(ranks)

    def rebuild(self, ranks: dict[str, int]) -> None:
        self.pairs = [(name, j) for name, r in ranks.items() for j in range(1, r + 1)]
        if not self.pairs:
            raise ValueError("SingleLayerSampler: no layer has a positive rank")
        self._order: Iterator[tuple[str, int]] = iter(())

    def __len__(self) -> int:
        return len(self.pairs)

    def __next__(self) -> tuple[str, int]:
        try:
            return next(self._order)
        except StopIteration:
            self._rng.shuffle(self.pairs)
            self._order = iter(list(self.pairs))
            return next(self._order)

    def __iter__(self):
        return self


def lowrank_params(out_f: int, in_f: int, rank: int) -> int:
    """Stored parameters of a layer at `rank`: (m + n) r, or m n once that is no smaller."""
    return min((out_f + in_f) * rank, out_f * in_f)


def allocate_ranks(
    importance: dict[str, Tensor], shapes: dict[str, tuple[int, int]], budget: float
) -> dict[str, int]:
    """Truncate every layer in importance order so the total stays within `budget` parameters.

    importance: per-layer (r,) non-increasing tensors; shapes: (out, in). Every layer keeps its
    first rank; further ranks are admitted in globally decreasing RELATIVE importance
    importance_i / importance_0 (the fraction of the layer's hierarchical mass still ahead of rank
    i), each costing out + in parameters until the layer reaches its dense size. Raw importance is
    not comparable across layers of different scale unless long group-lasso training has
    equalised them (layers would be emptied whole); the relative form is scale free, like
    WeLore's normalised spectra. Returns {name: rank >= 1}.
    """
    ranks = dict.fromkeys(importance, 1)
    used = sum(lowrank_params(*shapes[name], 1) for name in importance)
    entries = sorted(
        (
            (float(imp[i] / imp[0].clamp_min(1e-30)), name, i)
            for name, imp in importance.items()
            for i in range(1, len(imp))
        ),
        key=lambda e: -e[0],
    )
    for _, name, i in entries:
        if i != ranks[name]:
            continue  # prefixes only: a later rank never jumps an earlier one that did not fit
        out_f, in_f = shapes[name]
        extra = lowrank_params(out_f, in_f, i + 1) - lowrank_params(out_f, in_f, i)
        if used + extra > budget:
            continue
        ranks[name] = i + 1
        used += extra
    return ranks


def dense_is_smaller(out_f: int, in_f: int, rank: int) -> bool:
    """Maestro materialisation rule: a layer goes back to dense if (m + n) r >= m n."""
    return (out_f + in_f) * rank >= out_f * in_f

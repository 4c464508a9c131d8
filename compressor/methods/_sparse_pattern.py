"""Sparsity patterns and keep-masks: the column patterns of a sparse factor S (k, in) (N:M groups along
k, or the top fraction of each column), shared by DSFormer's factorization and SparseGPT's solver,
and the weight masks of `prune` (magnitude, Wanda; N:M or unstructured), which DSEE uses too."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..configs.patterns import parse_nm
from ..kernels.dispatch import nm_mask


def nm_column_mask(s: Tensor, n: int, m: int) -> Tensor:
    """Bool mask (k, in) keeping the n largest |s| of every m consecutive rows in each column.

    s: (k, in) with k % m == 0. Exactly n per group even when values tie (topk order).
    """
    return nm_mask(s.detach().abs().T, n, m).T


def topk_column_mask(s: Tensor, nnz: int) -> Tensor:
    """Bool mask (k, in) keeping the `nnz` largest |s| of each column (the unstructured pattern)."""
    keep = s.detach().abs().topk(nnz, dim=0).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(0, keep, True)


@dataclass(frozen=True)
class SparsePattern:
    """Column pattern of S: N:M groups along k (`m` > 0) or `nnz_ratio` of k per column (m == 0)."""

    n: int = 2
    m: int = 4
    nnz_ratio: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def density(self) -> float:
        return self.n / self.m if self.structured else self.nnz_ratio

    def nnz_per_column(self, k: int) -> int:
        return k // self.m * self.n if self.structured else max(1, round(self.nnz_ratio * k))

    def mask(self, s: Tensor) -> Tensor:
        if self.structured:
            return nm_column_mask(s, self.n, self.m)
        return topk_column_mask(s, self.nnz_per_column(s.shape[0]))

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured({self.nnz_ratio:g})"


def parse_pattern(pattern: str, density: float = 0.5) -> SparsePattern:
    """`"2:4"` -> SparsePattern(2, 4); `"unstructured"` -> SparsePattern(nnz_ratio=density).

    Raises ValueError with the reason; the config turns it into a ConfigError.
    """
    nm = parse_nm(pattern)
    return SparsePattern(n=0, m=0, nnz_ratio=density) if nm is None else SparsePattern(*nm)


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W| (out, in)."""
    return weight.detach().abs()


def wanda_scores(weight: Tensor, input_norms: Tensor) -> Tensor:
    """Wanda's |W_ij| * ||X_j||_2: weight (out, in), input_norms (in,) L2 norms -> (out, in)."""
    return weight.detach().abs() * input_norms.to(weight.dtype)[None, :]


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool = False) -> Tensor:
    """Bool mask removing the floor(sparsity * count) lowest scores (per row or over the matrix)."""
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    drop = int(sparsity * flat.shape[1])
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        lowest = flat.topk(drop, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask.reshape(scores.shape)


def prune_mask(
    scores: Tensor, pattern: str = "2:4", sparsity: float = 0.5, per_row: bool = False
) -> Tensor:
    """Bool keep-mask (out, in): N:M along in_features, or unstructured at `sparsity`."""
    parsed = parse_pattern(pattern)
    if parsed.structured:
        return nm_mask(scores, parsed.n, parsed.m)
    return unstructured_mask(scores, sparsity, per_row)


def magnitude_mask(
    weight: Tensor, sparsity: float = 0.5, pattern: str = "unstructured", per_row: bool = False
) -> Tensor:
    """Bool keep-mask of W by |W| (the data-free default DSEE prunes with)."""
    return prune_mask(magnitude_scores(weight), pattern, sparsity, per_row)

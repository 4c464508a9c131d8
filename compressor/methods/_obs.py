"""The Optimal Brain Surgeon sweep shared by SparseGPT (pruning) and GPTQ (quantization).

Both papers (Frantar & Alistarh, arXiv 2301.00774; Frantar et al., arXiv 2210.17323) solve the
same layer-wise problem: change W column by column so that the layer's output on the calibration
inputs X moves as little as possible. With H = XᵀX (dampened) and U the upper Cholesky factor of
H⁻¹ (H⁻¹ = UᵀU), replacing column c by a new value and re-fitting the columns not yet processed
is the OBS step

    e = (w_c − new_c) / U_cc,        W[:, c+1:] −= e · U[c, c+1:]

Processing columns left to right, one factorisation serves every column. Updates are lazy: inside
a block of `block_size` columns immediately, to the columns right of the block in one matrix
product per block. The only difference between the two methods is the per-column operation —
prune by the saliency w²/U_cc² (SparseGPT) or round to the grid (GPTQ) — supplied as a
`ColumnRule`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..numerics import cholesky_lower

__all__ = ["ColumnRule", "inverse_hessian_factor", "obs_sweep", "output_error"]


def inverse_hessian_factor(hessian: Tensor, dampening: float = 0.01) -> tuple[Tensor, Tensor]:
    """(U, dead): U upper-triangular with UᵀU = (H + λI)⁻¹, λ = dampening · mean(diag H), in fp64
    (plus `compressor.numerics`' eigen-shift in the rare case that is still not positive definite).

    dead (n,) bool marks inputs that were never active (zero diagonal): they get a unit diagonal
    so H stays invertible; the sweep's callers zero their weights (they never reach the output).
    """
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diagonal = torch.arange(h.shape[0], device=h.device)
    h[diagonal, diagonal] += dampening * torch.diag(h).mean()
    lower, _ = cholesky_lower(h)  # eigen-shifted if still not positive definite (numerics)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True), dead


class ColumnRule(Protocol):
    """The per-column operation of an OBS sweep."""

    def begin_block(self, block: Tensor, scale: Tensor, start: int, stop: int) -> None:
        """Called with the block's working columns (out, width) and diag(U) over them."""

    def column(self, block: Tensor, scale: Tensor, col: int, start: int) -> Tensor:
        """The new value (out,) of block column `col` (global column start + col), chosen from the
        block as updated so far; the sweep then feeds its error forward."""

    def end_block(self, start: int, stop: int) -> None:
        """Called after the block's columns took their new values."""


@torch.no_grad()
def obs_sweep(work: Tensor, upper: Tensor, block_size: int, rule: ColumnRule) -> None:
    """Run the lazy-block OBS sweep over `work` (out, in) in place against U = `upper`."""
    columns = work.shape[1]
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        errors = _sweep_block(work, upper, start, stop, rule)
        # lazy update: the whole block's compensation reaches the later columns in one product
        work[:, stop:] -= errors @ upper[start:stop, stop:]


def _sweep_block(work: Tensor, upper: Tensor, start: int, stop: int, rule: ColumnRule) -> Tensor:
    """Columns [start, stop) take the rule's values in place; returns the scaled errors (out, width)."""
    block = work[:, start:stop].clone()
    u_block = upper[start:stop, start:stop]
    scale = torch.diag(u_block)
    rule.begin_block(block, scale, start, stop)
    errors = torch.zeros_like(block)
    for col in range(stop - start):
        value = block[:, col]
        new = rule.column(block, scale, col, start)
        errors[:, col] = (value - new) / scale[col]
        # OBS: re-fit the block's remaining columns to absorb this column's change
        block[:, col:] -= errors[:, col : col + 1] * u_block[col : col + 1, col:]
        block[:, col] = new
    work[:, start:stop] = block
    rule.end_block(start, stop)
    return errors


def output_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """Relative calibration output error ‖X(W - Ŵ)ᵀ‖² / ‖XWᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    h = hessian.double()
    delta = weight.double() - new_weight.double()
    base = float(((weight.double() @ h) * weight.double()).sum())
    return float(((delta @ h) * delta).sum()) / max(base, 1e-300)

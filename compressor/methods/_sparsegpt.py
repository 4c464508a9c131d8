"""SparseGPT's solver (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", arXiv 2301.00774): choose a mask and update the surviving weights so the
layer's output on the calibration inputs moves as little as possible.

For one row w of W (every row shares the input Hessian H = XᵀX up to scale), removing weight c and
re-fitting the columns not yet processed is the Optimal Brain Surgeon step

    δw = -(w_c / [H_F⁻¹]_cc) · [H_F⁻¹]_{c,:}          (F = columns c, c+1, ..., n-1)

Processing columns left to right, the rows of H_F⁻¹ for every F are the rows of U, the upper
Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), divided by their diagonal: one factorisation serves all
columns. Updates are applied lazily: inside a block of `block_size` columns immediately, to the
columns right of the block in one matrix product per block. The mask is chosen as the columns are
reached, by the OBS saliency w²/[U]_cc² (for the whole block when unstructured, per group of M
columns when N:M), so earlier updates inform later choices.

Pure tensor maths; compressor.methods.prune wires it to the calibration loop and dsformer uses it
to initialise its sparse factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.dispatch import nm_mask
from ..numerics import cholesky_lower
from ._sparse_pattern import parse_pattern

__all__ = ["inverse_hessian_factor", "output_error", "sparsegpt_prune"]


def inverse_hessian_factor(hessian: Tensor, dampening: float = 0.01) -> tuple[Tensor, Tensor]:
    """(U, dead): U upper-triangular with UᵀU = (H + λI)⁻¹, λ = dampening · mean(diag H), in fp64
    (plus `compressor.numerics`' eigen-shift in the rare case that is still not positive definite).

    dead (n,) bool marks inputs that were never active (zero diagonal): they get a unit diagonal
    so H stays invertible; sparsegpt_prune zeroes their weights (they never reach the output).
    """
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diagonal = torch.arange(h.shape[0], device=h.device)
    h[diagonal, diagonal] += dampening * torch.diag(h).mean()
    lower, _ = cholesky_lower(h)  # eigen-shifted if still not positive definite (numerics)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    pattern: str = "2:4",
    sparsity: float = 0.5,
    block_size: int = 128,
    dampening: float = 0.01,
    mask: Tensor | None = None,
    nm_axis: str = "in",
) -> tuple[Tensor, Tensor]:
    """Prune W (out, in) against H (in, in) ∝ XᵀX -> (new weight in W's dtype, bool keep-mask).

    pattern "N:M" keeps N of every M consecutive inputs of each row (`nm_axis` "in", the 2:4
    tensor-core layout) or N of every M consecutive outputs of each column (`nm_axis` "out",
    dsformer's S, whose groups run along its atoms; chosen by w² as the column is reached, the
    column's [H⁻¹] factor being common to its entries); "unstructured" removes
    floor(sparsity · out · block) weights of every column block. A given `mask` (bool keep-mask,
    (out, in)) is used as is and only the OBS updates are computed.
    """
    if nm_axis not in ("in", "out"):
        raise ValueError(f"sparsegpt: `nm_axis` must be 'in' or 'out', got {nm_axis!r}")
    parsed = parse_pattern(pattern)
    # the factorisation runs in fp64; the column sweep in W's precision, at least fp32 (as the paper)
    precision = torch.promote_types(weight.dtype, torch.float32)
    upper, dead = inverse_hessian_factor(hessian, dampening)
    upper = upper.to(precision)
    work = weight.detach().to(precision).clone()
    work[:, dead] = 0.0
    keep = torch.ones_like(work, dtype=torch.bool)
    along_in = parsed.structured and nm_axis == "in"
    block_size = _aligned_block(block_size, parsed.m if along_in else 1)
    columns = work.shape[1]
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        fixed = None if mask is None else mask[:, start:stop].to(work.device)
        errors = _prune_block(work, upper, start, stop, keep, parsed, sparsity, fixed, nm_axis)
        # lazy update: the whole block's compensation reaches the later columns in one product
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    return work.to(weight.dtype), keep


def _prune_block(work, upper, start, stop, keep, parsed, sparsity, fixed, nm_axis) -> Tensor:
    """Prune columns [start, stop) in place (work, keep); returns the scaled errors (out, width)."""
    block = work[:, start:stop].clone()
    u_block = upper[start:stop, start:stop]
    scale = torch.diag(u_block)
    width = stop - start
    if fixed is not None:
        block_keep = fixed.clone()
    elif parsed.structured:
        block_keep = torch.ones_like(block, dtype=torch.bool)
    else:
        block_keep = _unstructured_keep(block.square() / scale.square(), sparsity)
    errors = torch.zeros_like(block)
    for col in range(width):
        if fixed is None and parsed.structured:
            _choose_nm(block, block_keep, scale, col, parsed, nm_axis)
        value = block[:, col]
        pruned = torch.where(block_keep[:, col], value, torch.zeros_like(value))
        errors[:, col] = (value - pruned) / scale[col]
        # OBS: re-fit the block's remaining columns to absorb this column's removed weights
        block[:, col:] -= errors[:, col : col + 1] * u_block[col : col + 1, col:]
        block[:, col] = pruned
    work[:, start:stop] = block
    keep[:, start:stop] = block_keep
    return errors


def _choose_nm(block: Tensor, block_keep: Tensor, scale: Tensor, col: int, parsed, nm_axis: str):
    """Fill the N:M keep-mask that column `col` is reached with (in place)."""
    if nm_axis == "out":  # groups down this column: all share scale[col], so w² decides
        block_keep[:, col] = nm_mask(block[:, col].square()[None, :], parsed.n, parsed.m)[0]
    elif col % parsed.m == 0:  # a group of M columns starts: choose it whole by w² / [U]_cc²
        group = slice(col, col + parsed.m)
        saliency = block[:, group].square() / scale[group].square()
        block_keep[:, group] = nm_mask(saliency, parsed.n, parsed.m)


def _unstructured_keep(saliency: Tensor, sparsity: float) -> Tensor:
    """Keep-mask dropping the floor(sparsity · numel) lowest saliencies of the block."""
    flat = saliency.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    drop = int(sparsity * flat.numel())
    if drop > 0:
        keep[flat.topk(drop, largest=False).indices] = False
    return keep.reshape(saliency.shape)


def _aligned_block(block_size: int, m: int) -> int:
    """A block width that is a multiple of M, so no N:M group straddles two blocks."""
    return max(block_size // m, 1) * m


def output_error(weight: Tensor, new_weight: Tensor, hessian: Tensor) -> float:
    """Relative calibration output error ‖X(W - Ŵ)ᵀ‖² / ‖XWᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    h = hessian.double()
    delta = weight.double() - new_weight.double()
    base = float(((weight.double() @ h) * weight.double()).sum())
    return float(((delta @ h) * delta).sum()) / max(base, 1e-300)

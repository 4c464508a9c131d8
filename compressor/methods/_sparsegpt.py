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

The sweep itself (factorisation, lazy blocks, error feedback) is `_obs.obs_sweep`, shared with
GPTQ; this module supplies the per-column rule (the mask). Pure tensor maths;
compressor.methods.prune wires it to the calibration loop and dsformer uses it to initialise its
sparse factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.dispatch import nm_mask
from ._obs import inverse_hessian_factor, obs_sweep, output_error
from ._sparse_pattern import parse_pattern

__all__ = ["inverse_hessian_factor", "output_error", "sparsegpt_prune"]


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
    rule = _PruneRule(keep, parsed, sparsity, mask, nm_axis)
    obs_sweep(work, upper, _aligned_block(block_size, parsed.m if along_in else 1), rule)
    return work.to(weight.dtype), keep


class _PruneRule:
    """SparseGPT's column operation: keep or zero each entry by the mask, chosen as the block
    (unstructured) or each N:M group is reached, or given."""

    def __init__(self, keep: Tensor, parsed, sparsity: float, mask: Tensor | None, nm_axis: str) -> None:
        self.keep, self.parsed, self.sparsity, self.mask, self.nm_axis = keep, parsed, sparsity, mask, nm_axis
        self.fixed: Tensor | None = None
        self.block_keep = keep

    def begin_block(self, block: Tensor, scale: Tensor, start: int, stop: int) -> None:
        self.fixed = None if self.mask is None else self.mask[:, start:stop].to(block.device)
        if self.fixed is not None:
            self.block_keep = self.fixed.clone()
        elif self.parsed.structured:
            self.block_keep = torch.ones_like(block, dtype=torch.bool)
        else:
            self.block_keep = _unstructured_keep(block.square() / scale.square(), self.sparsity)

    def column(self, block: Tensor, scale: Tensor, col: int, start: int) -> Tensor:
        if self.fixed is None and self.parsed.structured:
            _choose_nm(block, self.block_keep, scale, col, self.parsed, self.nm_axis)
        value = block[:, col]
        return torch.where(self.block_keep[:, col], value, torch.zeros_like(value))

    def end_block(self, start: int, stop: int) -> None:
        self.keep[:, start:stop] = self.block_keep


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

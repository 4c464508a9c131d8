"""NOLA's pure numerics: seeded random bases and their linear combinations (see nola.py).

Every basis is drawn on the CPU from a torch.Generator, so a seed means the same bases on every
device (CUDA generators produce other numbers). A layer seed s drives three streams: 3s for A's
fixed Kaiming part, 3s + 1 for A's bases, 3s + 2 for B's bases. The chunk size fixes how the
stream is cut into bases, so it is part of the adapter format.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

BASIS_CHUNK = 64
FIXED, BASES_A, BASES_B = 0, 1, 2


def stream_seed(layer_seed: int, stream: int) -> int:
    return 3 * int(layer_seed) + stream


def basis_chunks(seed: int, num_basis: int, numel: int) -> Iterator[tuple[int, Tensor]]:
    """(start, bases (c, numel)), every basis ~ U(−1, 1)/√num_basis, fp32 on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(num_basis)
    for start in range(0, num_basis, BASIS_CHUNK):
        count = min(BASIS_CHUNK, num_basis - start)
        chunk = torch.empty(count, numel, device="cpu").uniform_(-1.0, 1.0, generator=generator)
        yield start, chunk.mul_(scale)


def random_bases(seed: int, num_basis: int, numel: int) -> Tensor:
    """All bases of one stream, (num_basis, numel)."""
    return torch.cat([chunk for _, chunk in basis_chunks(seed, num_basis, numel)])


def kaiming_fixed(seed: int, rows: int, cols: int) -> Tensor:
    """A₀ (rows, cols) ~ U(−1/√cols, 1/√cols): nn.Linear's kaiming_uniform_(a=√5), seeded."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(rows, cols, device="cpu").uniform_(-bound, bound, generator=generator)


class _SeededCombination(torch.autograd.Function):
    """Σ_i c_i · basis_i without keeping the bases: both passes regenerate them from the seed."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, seed: int, rows: int, cols: int) -> Tensor:
        ctx.seed, ctx.numel, ctx.count = seed, rows * cols, len(coefficients)
        coef = coefficients.detach().float()
        out = torch.zeros(rows * cols, device=coefficients.device)
        for start, chunk in basis_chunks(seed, len(coef), rows * cols):
            out += coef[start : start + len(chunk)] @ chunk.to(coefficients.device)
        return out.view(rows, cols).to(coefficients.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # ∂(Σ c_i basis_i)/∂c_i = basis_i, so grad_i = <grad, basis_i>: one regenerated chunk
        # at a time.
        flat = grad.reshape(-1).float()
        chunks = basis_chunks(ctx.seed, ctx.count, ctx.numel)
        grads = [chunk.to(grad.device) @ flat for _, chunk in chunks]
        return torch.cat(grads).to(grad.dtype), None, None, None


def combine_bases(coefficients: Tensor, seed: int, rows: int, cols: int) -> Tensor:
    """Σ_i coefficients[i] · basis_i as (rows, cols), the bases regenerated from `seed`."""
    return _SeededCombination.apply(coefficients, seed, rows, cols)


def nola_factors(
    coef_a: Tensor, coef_b: Tensor, seed: int, rank: int, in_features: int, out_features: int,
    fixed: Tensor | None = None, bases: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A = A₀ + Σ a_i A_i (rank, in) and B = Σ b_j B_j (out, rank) of one layer.

    `fixed`: A₀ if already drawn. `bases`: cached (k, rank·in) and (l, out·rank) bases; None =
    regenerate them inside the autograd function (memory: one chunk).
    """
    if fixed is None:
        fixed = kaiming_fixed(stream_seed(seed, FIXED), rank, in_features)
    fixed = fixed.to(coef_a.device, coef_a.dtype)
    if bases is not None:
        a = fixed + (coef_a @ bases[0]).view(rank, in_features)
        return a, (coef_b @ bases[1]).view(out_features, rank)
    a = fixed + combine_bases(coef_a, stream_seed(seed, BASES_A), rank, in_features)
    return a, combine_bases(coef_b, stream_seed(seed, BASES_B), out_features, rank)

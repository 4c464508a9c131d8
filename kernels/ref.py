"""Pure-torch references: the specification of every op in `compressor.kernels`.

Conventions shared by all ops (and by their Triton implementations, which have the same names and
signatures):

* `x` is (..., in_features); any leading dims; the result is (..., out_features) in x.dtype.
* All float operands share one dtype (float32, float16, bfloat16; float64 in the reference only)
  and one device; mismatches raise ValueError instead of silently casting.
* The reference computes with torch ops in x.dtype (torch accumulates matmuls in fp32 for 16-bit
  inputs) and rounds intermediate products such as t = x @ V.T to x.dtype; the Triton kernels keep
  some intermediates in fp32, so they agree within the tolerances stated in tests/kernels.
* The reference runs on any device and is differentiable (autograd flows to every float operand);
  the Triton kernels are forward-only.
* N:M operands use the layout of `compressor.kernels.packing` (either index layout).
* Weight-only quantized operands: `qweight` uint8 (out, ceil(in·b/8)) holds unsigned b-bit codes
  packed along in_features (`packing.pack_int`); `scales` (out, in/g) one per group of g
  consecutive inputs of a row; `zeros` None (symmetric: ŵ = s·(c − 2^(b−1))) or uint8 (out, in/g)
  (asymmetric: ŵ = s·(c − z)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .packing import unpack_int, unpack_nm

__all__ = [
    "dense_sparse_linear",
    "dequantize_int",
    "dsee_linear",
    "dsee_nm_linear",
    "lora_linear",
    "low_rank_linear",
    "mezo_axpy_",
    "mezo_normal",
    "nm_linear",
    "quant_linear",
]


def low_rank_linear(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Low-rank linear layer y = (x @ v.T) @ u.T + bias.

    x (..., in), v (rank, in), u (out, rank), bias (out,) or None -> (..., out).
    """
    _checks.low_rank_linear(x, u, v, bias)
    return F.linear(F.linear(x, v), u, bias)


def dequantize_int(
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """The (out, in_features) weight of packed b-bit codes, in scales.dtype: ŵ = s·(c − z), with
    z = 2^(b−1) when `zeros` is None (symmetric grid)."""
    _checks.int_quantized("dequantize_int", qweight, scales, zeros, bits, group_size, in_features)
    out_f = qweight.shape[0]
    codes = unpack_int(qweight, bits, in_features).to(scales.dtype)
    codes = codes.reshape(out_f, in_features // group_size, group_size)
    offset = zeros.to(scales.dtype).unsqueeze(-1) if zeros is not None else 2 ** (bits - 1)
    return ((codes - offset) * scales.unsqueeze(-1)).reshape(out_f, in_features)


def quant_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor:
    """Weight-only quantized linear y = x @ Ŵ.T + bias, Ŵ = `dequantize_int(...)`.

    x (..., in_features) in scales.dtype; bias (out,) or None -> (..., out).
    """
    _checks.quant_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    return F.linear(x, dequantize_int(qweight, scales, zeros, bits, group_size, in_features), bias)


def nm_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    n: int,
    m: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """Linear layer with an N:M-sparse weight packed along in_features: y = x @ W.T + bias.

    x (..., in_features); W (out, in_features) given as values (out, in_features//m*n) and
    indices uint8 (out, in_features//m*n) or bit-packed; bias (out,) -> (..., out).
    """
    _checks.nm_linear(x, values, indices, n, m, in_features, bias)
    return F.linear(x, unpack_nm(values, indices, n, m, in_features), bias)


def dense_sparse_linear(
    x: Tensor,
    d: Tensor,
    s_values: Tensor,
    s_indices: Tensor,
    n: int,
    m: int,
    k: int,
    bias: Tensor | None = None,
) -> Tensor:
    """DSFormer layer y = (x @ S.T) @ D.T + bias, i.e. W = D @ S.

    D (out, k) dense. S (k, in) keeps n of every m consecutive entries along k in each column; it is
    stored as the packing of S.T (in, k) along k: s_values (in, k//m*n), s_indices uint8 (same or
    bit-packed). x (..., in) -> (..., out).
    """
    _checks.dense_sparse_linear(x, d, s_values, s_indices, n, m, k, bias)
    s_t = unpack_nm(s_values, s_indices, n, m, k)  # (in, k)
    return F.linear(x @ s_t, d, bias)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    bias: Tensor | None = None,
) -> Tensor:
    """LoRA forward y = x @ W.T + bias + scaling * (x @ A.T) @ B.T.

    x (..., in), weight (out, in), lora_a (r, in), lora_b (out, r), bias (out,) -> (..., out).
    """
    _checks.lora_linear(x, weight, lora_a, lora_b, scaling, bias)
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)


def dsee_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    delta_rows: Tensor,
    delta_cols: Tensor,
    delta_values: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """DSEE forward y = x @ W.T + bias + scaling * (x @ A.T) @ B.T + x @ S2.T.

    weight (out, in) (usually already pruned), lora_a (r, in), lora_b (out, r); S2 (out, in) is a
    sparse delta given as COO: delta_rows, delta_cols int64 (nnz,), delta_values (nnz,) x.dtype.
    Duplicate coordinates add up. x (..., in) -> (..., out).
    """
    _checks.dsee_linear(
        x, weight, lora_a, lora_b, scaling, delta_rows, delta_cols, delta_values, bias
    )
    y = lora_linear(x, weight, lora_a, lora_b, scaling, bias)
    return _add_sparse_delta(y, x, delta_rows, delta_cols, delta_values)


def dsee_nm_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    n: int,
    m: int,
    in_features: int,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    delta_rows: Tensor,
    delta_cols: Tensor,
    delta_values: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """`dsee_linear` whose base weight is N:M-packed along in_features (layout of `nm_linear`)."""
    _checks.dsee_nm_linear(
        x,
        values,
        indices,
        n,
        m,
        in_features,
        lora_a,
        lora_b,
        scaling,
        delta_rows,
        delta_cols,
        delta_values,
        bias,
    )
    y = nm_linear(x, values, indices, n, m, in_features, bias)
    y = y + scaling * F.linear(F.linear(x, lora_a), lora_b)
    return _add_sparse_delta(y, x, delta_rows, delta_cols, delta_values)


def _add_sparse_delta(y: Tensor, x: Tensor, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """y (..., out) + x @ S2.T with S2 in COO form, without materialising S2."""
    contributions = x[..., cols] * values  # (..., nnz)
    return y.index_add(-1, rows, contributions)


# -- MeZO: counter-based Gaussian noise, identical to Triton's tl.randn4x --------------------------
#
# z[i] for a tensor perturbed at stream position `offset` is normal number g = offset + i of the
# stream `seed`: Philox-4x32-10 with key (seed low 32 bits, seed high 32 bits) applied to the
# counter (g // 4 low 32 bits, g // 4 high 32 bits, 0, 0) gives four uint32s; each becomes a uniform
# in [0, 1) as in triton.language.random.uint_to_uniform_float, and Box-Muller turns the pairs
# (u0, u1), (u2, u3) into (r cos, r sin) twice, so z[g] is lane g % 4 of that quadruple. This is
# exactly `tl.randn4x(seed, g // 4)`; four normals per Philox call keep the kernel memory-bound.
#
# Python ints are exact, and int64 tensor products wrap modulo 2**64, so a 32x32-bit product's high
# and low halves are `(p >> 32) & MASK` and `p & MASK` even when p overflows int64.

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_ROUNDS = 10
_UINT_TO_UNIFORM = 4.6566127342e-10  # Triton's scale: largest with (2**31 - 1) * scale < 1 in fp32
_TWO_PI = 6.283185307179586
# Counters per chunk: 2**16 counters = 2**18 normals; peak extra memory is a few int64 temporaries
# of that length (~0.5 MB each), independent of the tensor size.
_CHUNK_COUNTERS = 1 << 16


def _philox4x32(counter: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 of (counter lo, counter hi, 0, 0) keyed by seed; int64s in [0, 2**32)."""
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_PHILOX_ROUNDS):
        prod_b, prod_a = c2 * _PHILOX_ROUND_B, c0 * _PHILOX_ROUND_A
        c0 = ((prod_b >> 32) & _MASK32) ^ c1 ^ k0
        c2 = ((prod_a >> 32) & _MASK32) ^ c3 ^ k1
        c1, c3 = prod_b & _MASK32, prod_a & _MASK32
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint_to_uniform(bits: Tensor) -> Tensor:
    """uint32 (in int64) -> float32 in [0, 1) as Triton does: read as int32, fold negatives by ~."""
    folded = torch.where(bits >= 1 << 31, _MASK32 - bits, bits)  # ~(bits - 2**32) == 2**32-1-bits
    return folded.to(torch.float32) * torch.tensor(_UINT_TO_UNIFORM, dtype=torch.float32)


def _box_muller(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    u1 = torch.clamp_min(u1, torch.tensor(1.0e-7, dtype=torch.float32))
    theta = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(torch.log(u1) * -2.0)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _normals(seed: int, start: int, count: int, device: torch.device) -> Tensor:
    """float32 (count,): normals number start .. start+count-1 of stream `seed`."""
    first, last = start // 4, (start + count - 1) // 4
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    bits = _philox4x32(counters, seed)
    n0, n1 = _box_muller(_uint_to_uniform(bits[0]), _uint_to_uniform(bits[1]))
    n2, n3 = _box_muller(_uint_to_uniform(bits[2]), _uint_to_uniform(bits[3]))
    quads = torch.stack((n0, n1, n2, n3), dim=-1).reshape(-1)  # lane g % 4 of counter g // 4
    skip = start - 4 * first
    return quads[skip : skip + count]


def mezo_normal(
    numel: int,
    seed: int,
    offset: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The MeZO noise z (numel,) at stream positions offset .. offset+numel-1, cast to `dtype`."""
    numel = _checks.integer("mezo_normal", "numel", numel)
    _checks.integer("mezo_normal", "seed", seed)
    _checks.integer("mezo_normal", "offset", offset)
    out = torch.empty(numel, dtype=dtype, device=device)
    step = 4 * _CHUNK_COUNTERS
    for begin in range(0, numel, step):
        count = min(step, numel - begin)
        out[begin : begin + count] = _normals(seed, offset + begin, count, out.device)
    return out


@torch.no_grad()
def mezo_axpy_(param: Tensor, seed: int, offset: int, scale: float) -> None:
    """In place param += scale * z, z = `mezo_normal(param.numel(), seed, offset)` viewed as param.

    param: contiguous float tensor (any shape). The sum is formed in fp32
    (param + float32(scale) * z) and rounded once to param.dtype. Give each tensor of a model its
    own `offset` (the running sum of
    the numels before it) so the whole model draws one stream. Because z depends only on
    (seed, offset), the MeZO step "+eps, -2eps, +eps" with one seed returns the weights to their
    original values up to rounding (exactly in fp32 for most entries, within 1-2 ulp otherwise).
    """
    scale = _checks.mezo(param, seed, offset, scale)
    flat = param.view(-1)
    step = 4 * _CHUNK_COUNTERS
    for begin in range(0, flat.numel(), step):
        chunk = flat[begin : begin + step]
        z = _normals(seed, offset + begin, chunk.numel(), param.device)
        if param.dtype == torch.float64:
            chunk.add_(z.double() * scale)
        else:
            chunk.copy_(chunk.float() + z * torch.tensor(scale, dtype=torch.float32))

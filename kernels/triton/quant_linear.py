"""Weight-only quantized linear y = x @ Ŵ.T + bias from packed b-bit codes (b in 2, 3, 4, 8).

Ŵ never exists in memory: each (BLOCK_N, BLOCK_K) tile of codes is read from the packed bytes
(code j of a row at bits [j·b, (j+1)·b) of the row's little-endian stream, `packing.pack_int`),
dequantized in registers with its group's scale and zero point, ŵ = s·(c − z) (z = 2^(b−1) when
symmetric), rounded to x's dtype as the reference rounds Ŵ, and fed to tl.dot with an fp32
accumulator. Each code is read from a 16-bit window of two neighbouring bytes, so 3-bit codes
that straddle a byte boundary need no special case (the second byte is an L1 hit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _checks
from ._common import as_rows, check_runnable, dot_precision, host_rounding, interpreting, upcast_dot
from ._linear import _mma, _operand


@triton.jit
def _codes(q_ptr, rn, rk, n_ok, k_ok, stride_q, K, BITS: tl.constexpr):
    """Codes (BLOCK_N, BLOCK_K) int32 of rows rn, inputs rk."""
    bit = rk * BITS
    byte = bit // 8
    ok = n_ok[:, None] & k_ok[None, :]
    row = q_ptr + rn[:, None] * stride_q
    word = tl.load(row + byte[None, :], mask=ok, other=0).to(tl.int32)
    if (8 % BITS) != 0:  # codes may run into the next byte
        last_byte = (K * BITS - 1) // 8
        nxt = ok & (byte[None, :] + 1 <= last_byte)
        word = word | (tl.load(row + byte[None, :] + 1, mask=nxt, other=0).to(tl.int32) << 8)
    return (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _quant_linear_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_q, stride_s, stride_z, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        code = _codes(q_ptr, rn, rk, n_ok, k_ok, stride_q, K, BITS).to(tl.float32)
        ok = n_ok[:, None] & k_ok[None, :]
        group = (rk // GROUP)[None, :]
        scale = tl.load(s_ptr + rn[:, None] * stride_s + group, mask=ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rn[:, None] * stride_z + group, mask=ok, other=0).to(tl.float32)
        else:
            zero = tl.full((1, 1), 1 << (BITS - 1), tl.float32)
        # (c − z)·s is exact in fp32 (small integer times a 16-bit scale), then rounded to x's dtype:
        # the reference's Ŵ entry for entry.
        w = _operand((code - zero) * scale, x.dtype, UPCAST)
        acc += _mma(_operand(x, x.dtype, UPCAST), tl.trans(w), PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _blocks(rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small under the interpreter; skinny M for decode on a GPU."""
    if interpreting():
        return 16, 16, 32
    return (16 if rows <= 16 else 64), 64, 64


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
    """Same contract as `compressor.kernels.ref.quant_linear`."""
    out_f = _checks.quant_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    check_runnable("quant_linear", x)
    rows = as_rows(x)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    out_dtype = torch.float32 if host_rounding(x.dtype) else x.dtype
    y = torch.empty(rows.shape[0], out_f, dtype=out_dtype, device=x.device)
    block_m, block_n, block_k = _blocks(rows.shape[0])
    grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(out_f, block_n))
    _quant_linear_kernel[grid](
        rows, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        rows.shape[0], out_f, in_features,
        rows.stride(0), rows.stride(1), qweight.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, y.stride(0),
        BITS=bits, GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
    )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)

"""One fused linear kernel that every matmul op in this package launches.

    y = x @ W.T  [+ bias]  [+ scaling * t @ B.T]  [+ x @ S2.T]        x (M, K), W (N, K), y (M, N)

* W is dense (N, K), or N:M-packed along K (`nm_linear`: W's rows are packed), or N:M-packed
  along N (DSFormer's S: the stored matrix is W.T (K, N), packed along N). Packed tiles are
  expanded in registers, so only packed bytes leave DRAM: `_nm_tile` reads values and
  (bit-packed) indices with contiguous loads and expands whole groups with a compare/select
  (power-of-two n:m such as 2:4); `_nm_gather` handles any other n:m by looking up, for each
  dense entry, the n slots of its group (more load instructions, all L1 hits).
* The LoRA term takes t = x @ A.T (M, R) precomputed by a first light launch of this same kernel;
  fusing A into the main loop would redo x @ A.T for every output block (r / BLOCK_N extra FLOPs,
  6-12 %), while the separate launch costs one more read of x (~4 % at batch 4096, ~1 launch at
  batch 1).
* The sparse delta S2 (COO) is added in the epilogue: each output block scans the nnz entries,
  gathers x[:, cols] and scatters into its columns through a one-hot tl.dot. Cost is
  O(blocks * nnz) cached reads: right for DSEE's fixed supports (tens to thousands of entries),
  not for deltas with millions of entries (merge those into W instead).

Two launch shapes of the same kernel:

* planned (M <= 16 decode rows, or a narrow output N <= 64 such as t = x @ A.T): the tile shape
  comes from `plan` so that every SM gets a program, and when even the smallest tile leaves SMs
  idle (e.g. the rank-sized first stage of a low-rank layer at batch 1) the reduction is split
  across programs, partial sums meeting in an fp32 buffer through atomics. W's bytes are streamed
  exactly once either way; only the K tile and pipelining are autotuned.
* tiled (M > 16 and N > 64): classic grouped tl.dot tiling, autotuned, no split-K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..packing import nm_index_bits
from ._common import configs, dot_precision, host_rounding, interpreting, sm_count, upcast_dot

SKINNY_ROWS = 16
NARROW_COLS = 64
_MAX_SPLIT_K = 32


@dataclass(frozen=True)
class PackedNM:
    """N:M-packed weight. along_k: W (N, K) packed along K; else W.T (K, N) packed along N."""

    values: Tensor
    indices: Tensor
    n: int
    m: int
    along_k: bool

    @property
    def index_bits(self) -> int:
        """8 when there is one uint8 per value, else the bit-packed width."""
        return 8 if self.indices.shape[-1] == self.values.shape[-1] else nm_index_bits(self.m)


# -- device code -----------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _operand(a, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """a rounded to the dot's input dtype (left in fp32 under UPCAST, see _common.upcast_dot)."""
    if UPCAST:
        out = a
    else:
        out = a.to(dtype)
    return out


@triton.jit
def _nm_index(idx_ptr, prow, slot, mask, stride_i, INDEX_BITS: tl.constexpr):
    """Position inside its group of packed slot `slot` of packed row `prow` (int32)."""
    if INDEX_BITS == 8:
        pos = tl.load(idx_ptr + prow * stride_i + slot, mask=mask, other=0).to(tl.int32)
    else:
        PER_BYTE: tl.constexpr = 8 // INDEX_BITS
        byte = tl.load(idx_ptr + prow * stride_i + slot // PER_BYTE, mask=mask, other=0)
        shift = (slot % PER_BYTE) * INDEX_BITS
        pos = (byte.to(tl.int32) >> shift) & ((1 << INDEX_BITS) - 1)
    return pos


@triton.jit
def _nm_gather(
    val_ptr,
    idx_ptr,
    prow,
    pcol,
    mask,
    stride_v,
    stride_i,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    INDEX_BITS: tl.constexpr,
):
    """Dense entries P[prow, pcol] of a matrix packed N:M along its columns (prow/pcol broadcast).

    For every output entry, look at the n slots of its group and select the one whose stored
    position matches (positions in a group are distinct); neighbouring entries read the same
    slots, so the gathers hit L1 and DRAM only sees the packed bytes. Selects, not adds: no
    arithmetic in the weight dtype (the Triton 3.9 interpreter would do bf16 adds on raw bits).
    """
    group = pcol // NM_M
    pos = pcol - group * NM_M
    slot = group * NM_N
    value = tl.load(val_ptr + prow * stride_v + slot, mask=mask, other=0.0)
    hit = _nm_index(idx_ptr, prow, slot, mask, stride_i, INDEX_BITS) == pos
    dense = tl.where(hit, value, tl.zeros_like(value))
    for s in tl.static_range(1, NM_N):
        value = tl.load(val_ptr + prow * stride_v + slot + s, mask=mask, other=0.0)
        hit = _nm_index(idx_ptr, prow, slot + s, mask, stride_i, INDEX_BITS) == pos
        dense = tl.where(hit, value, dense)
    return dense


@triton.jit
def _nm_positions(
    idx_ptr, rows, row_ok, slot0, n_slots, stride_i, S: tl.constexpr, INDEX_BITS: tl.constexpr
):
    """Positions (ROWS, S) int32 of packed slots slot0 .. slot0+S-1 from contiguous index loads.

    Bit-packed bytes are loaded once and fanned out with shifts (slot0 is a multiple of S, and S
    of the indices per byte, so the tile starts on a byte boundary).
    """
    if INDEX_BITS == 8:
        slots = slot0 + tl.arange(0, S)
        live = row_ok[:, None] & (slots[None, :] < n_slots)
        pos = tl.load(idx_ptr + rows[:, None] * stride_i + slots[None, :], mask=live, other=0)
        pos = pos.to(tl.int32)
    else:
        PER_BYTE: tl.constexpr = 8 // INDEX_BITS
        byte_idx = slot0 // PER_BYTE + tl.arange(0, S // PER_BYTE)
        live = row_ok[:, None] & (byte_idx[None, :] * PER_BYTE < n_slots)
        packed = tl.load(idx_ptr + rows[:, None] * stride_i + byte_idx[None, :], mask=live, other=0)
        shifts = tl.arange(0, PER_BYTE) * INDEX_BITS
        fanned = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & (
            (1 << INDEX_BITS) - 1
        )
        pos = tl.reshape(fanned, (packed.shape[0], S))
    return pos


@triton.jit
def _nm_tile(
    val_ptr,
    idx_ptr,
    rows,
    col0,
    n_rows,
    n_slots,
    stride_v,
    stride_i,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Dense (ROWS, COLS) tile, columns col0.., of a matrix packed N:M along its columns.

    For power-of-two n, m (`nm_fast_path`): values and indices are read with contiguous loads
    (the packed bytes once), then each group's m positions are compared with its n stored
    positions in registers: (ROWS, G, n, 1) vs (m,) -> select -> sum over n (a single term is
    non-zero, so the fp32 sum is exact) -> (ROWS, G * m).
    """
    G: tl.constexpr = COLS // NM_M
    S: tl.constexpr = G * NM_N
    slot0 = (col0 // NM_M) * NM_N
    slots = slot0 + tl.arange(0, S)
    row_ok = rows < n_rows
    live = row_ok[:, None] & (slots[None, :] < n_slots)
    vals = tl.load(val_ptr + rows[:, None] * stride_v + slots[None, :], mask=live, other=0.0)
    pos = _nm_positions(idx_ptr, rows, row_ok, slot0, n_slots, stride_i, S, INDEX_BITS)
    hit = tl.reshape(pos, (ROWS, G, NM_N, 1)) == tl.arange(0, NM_M)[None, None, None, :]
    picked = tl.where(hit, tl.reshape(vals.to(tl.float32), (ROWS, G, NM_N, 1)), 0.0)
    dense = tl.reshape(tl.sum(picked, axis=2), (ROWS, COLS))
    return _operand(dense, vals.dtype, UPCAST)


@triton.jit
def _load_wt(
    w_ptr,
    idx_ptr,
    k0,
    n0,
    K,
    N,
    stride_wa,
    stride_wb,
    stride_i,
    W_FORMAT: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    NM_FAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Tile of W.T at (k0, n0): (BLOCK_K, BLOCK_N), zero outside (K, N).

    When packed, K (along K) or N (along N) is a multiple of m and tiles start on group bounds.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    if W_FORMAT == 0:  # dense W (N, K)
        wt = tl.load(
            w_ptr + offs_n[None, :] * stride_wa + offs_k[:, None] * stride_wb, mask=mask, other=0.0
        )
    elif W_FORMAT == 1:  # W (N, K) packed along K: packed rows are n, packed columns k
        if NM_FAST:
            w = _nm_tile(w_ptr, idx_ptr, offs_n, k0, N, K // NM_M * NM_N, stride_wa, stride_i,
                         BLOCK_N, BLOCK_K, NM_N, NM_M, INDEX_BITS, UPCAST)  # fmt: skip
            wt = tl.trans(w)
        else:
            wt = _nm_gather(w_ptr, idx_ptr, offs_n[None, :], offs_k[:, None], mask, stride_wa,
                            stride_i, NM_N, NM_M, INDEX_BITS)  # fmt: skip
    else:  # W.T (K, N) packed along N
        if NM_FAST:
            wt = _nm_tile(w_ptr, idx_ptr, offs_k, n0, K, N // NM_M * NM_N, stride_wa, stride_i,
                          BLOCK_K, BLOCK_N, NM_N, NM_M, INDEX_BITS, UPCAST)  # fmt: skip
        else:
            wt = _nm_gather(w_ptr, idx_ptr, offs_k[:, None], offs_n[None, :], mask, stride_wa,
                            stride_i, NM_N, NM_M, INDEX_BITS)  # fmt: skip
    return wt


@triton.jit
def _lora_term(
    t_ptr,
    b_ptr,
    offs_m,
    offs_n,
    M,
    N,
    R,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """t[offs_m] @ B[offs_n].T, (BLOCK_M, BLOCK_N) fp32; t rounded to B's dtype as in the ref."""
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        t = tl.load(
            t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
            other=0.0,
        )
        bt = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
            mask=(offs_r[:, None] < R) & (offs_n[None, :] < N),
            other=0.0,
        )
        out += _mma(_operand(t, bt.dtype, UPCAST), bt, PRECISION, UPCAST)
    return out


@triton.jit
def _delta_term(
    x_ptr,
    rows_ptr,
    cols_ptr,
    vals_ptr,
    offs_m,
    offs_n,
    M,
    K,
    NNZ,
    stride_xm,
    stride_xk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(x @ S2.T)[offs_m, offs_n] for S2 in COO; entries outside the matrix contribute nothing."""
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, NNZ, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        live = offs_e < NNZ
        rows = tl.load(rows_ptr + offs_e, mask=live, other=-1)
        cols = tl.load(cols_ptr + offs_e, mask=live, other=0)
        vals = tl.load(vals_ptr + offs_e, mask=live, other=0.0)
        usable = live & (cols >= 0) & (cols < K)
        xg = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & usable[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_E)
        contrib = _operand(xg.to(tl.float32) * vals.to(tl.float32)[None, :], vals.dtype, UPCAST)
        onehot = (rows[:, None] == offs_n[None, :]).to(tl.float32)  # (BLOCK_E, BLOCK_N)
        out += _mma(contrib, _operand(onehot, vals.dtype, UPCAST), PRECISION, UPCAST)
    return out


@triton.jit
def _fused_linear_kernel(
    x_ptr,
    w_ptr,
    idx_ptr,
    bias_ptr,
    t_ptr,
    b_ptr,
    rows_ptr,
    cols_ptr,
    dvals_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    NNZ,
    M_KEY,
    stride_xm,
    stride_xk,
    stride_wa,
    stride_wb,
    stride_i,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    scaling,
    W_FORMAT: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    NM_FAST: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of y over one K split; see the module docstring.

    Grid: (output tiles, SPLIT_K). With ATOMIC the tile is added into an fp32 y (split-K
    partial sums); otherwise it is stored in y's dtype. M_KEY only feeds the autotune key.
    """
    # -- which output tile: grouped ordering so neighbouring programs share x rows in L2 --
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    # -- this program's slice of the reduction (all of K unless split-K) --
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + tiles_per_split * BLOCK_K)

    # -- main loop: stream W once --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_end),
            other=0.0,
        )
        wt = _load_wt(w_ptr, idx_ptr, k0, pid_n * BLOCK_N, k_end, N, stride_wa, stride_wb,
                      stride_i, W_FORMAT, NM_N, NM_M, INDEX_BITS, NM_FAST, BLOCK_K, BLOCK_N,
                      UPCAST)  # fmt: skip
        acc += _mma(_operand(xt, wt.dtype, UPCAST), wt, PRECISION, UPCAST)

    # -- epilogue terms, added once (by the first K split) --
    if pid_k == 0:
        if HAS_LORA:
            acc += scaling * _lora_term(
                t_ptr,
                b_ptr,
                offs_m,
                offs_n,
                M,
                N,
                R,
                stride_tm,
                stride_tr,
                stride_bn,
                stride_br,
                BLOCK_M,
                BLOCK_N,
                BLOCK_R,
                PRECISION,
                UPCAST,
            )
        if HAS_DELTA:
            acc += _delta_term(
                x_ptr,
                rows_ptr,
                cols_ptr,
                dvals_ptr,
                offs_m,
                offs_n,
                M,
                K,
                NNZ,
                stride_xm,
                stride_xk,
                BLOCK_M,
                BLOCK_N,
                BLOCK_E,
                PRECISION,
                UPCAST,
            )
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]

    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=out_mask, sem="relaxed")
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# -- autotuned launch shapes -----------------------------------------------------------------------

_KEY = ["M_KEY", "N", "K", "W_FORMAT", "HAS_LORA", "HAS_DELTA"]

# Planned launches (decode rows, or a narrow output such as t = x @ A.T): the tile shape and split-K
# come from `plan`, only the K tile and pipelining are tuned. Memory-bound: deep pipelines and wide
# K tiles keep enough bytes in flight per SM.
_PLANNED = configs(
    gpu=[
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 256}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_K": 512}, num_warps=8, num_stages=3),
    ],
    interpreted=triton.Config({"BLOCK_K": 32}),
)

# Prefill/training: compute-bound tl.dot tiles (Hopper-friendly shapes).
_TILED = configs(
    gpu=[
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4
        ),
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4
        ),
    ],
    interpreted=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}),
)

# reset_to_zero: benchmarking a config must not leave partial sums in an atomic output buffer.
_planned_kernel = triton.autotune(_PLANNED, key=_KEY, reset_to_zero=["y_ptr"])(_fused_linear_kernel)
_tiled_kernel = triton.autotune(_TILED, key=_KEY, reset_to_zero=["y_ptr"])(_fused_linear_kernel)


def nm_fast_path(n: int, m: int, index_bits: int) -> bool:
    """Whether packed tiles can use `_nm_tile` (contiguous loads) rather than `_nm_gather`.

    Needs power-of-two n and m, and every tile (all tile sizes are powers of two >= 16) to hold
    whole groups and whole index bytes.
    """
    pow2 = n & (n - 1) == 0 and m & (m - 1) == 0
    smallest_tile = 16
    slots = smallest_tile // m * n
    whole_bytes = index_bits == 8 or slots % (8 // index_bits) == 0
    return pow2 and smallest_tile % m == 0 and slots > 0 and whole_bytes


def plan(rows: int, n_out: int, k: int, sms: int, min_k_per_split: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT_K) for a planned launch.

    Decode (rows <= 16): BLOCK_M = 16 and the widest BLOCK_N that still gives one program per SM.
    Narrow output (n_out <= 64): BLOCK_N covers n_out and the tallest BLOCK_M that does the same.
    When even the smallest tile leaves SMs idle, the reduction is split across programs (each
    split keeps at least `min_k_per_split` of K) and partial sums meet in an fp32 buffer.
    """
    if rows <= SKINNY_ROWS:
        block_m, block_n = (
            SKINNY_ROWS,
            next((bn for bn in (64, 32, 16) if triton.cdiv(n_out, bn) >= sms), 16),
        )
    else:
        block_n = max(16, triton.next_power_of_2(n_out))
        block_m = next((bm for bm in (128, 64, 32) if triton.cdiv(rows, bm) >= sms), 32)
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n_out, block_n)
    split = (
        1
        if tiles >= sms
        else min(triton.cdiv(sms, tiles), max(1, k // min_k_per_split), _MAX_SPLIT_K)
    )
    return block_m, block_n, split


def fused_linear(
    x: Tensor,
    weight: Tensor | PackedNM,
    n_out: int,
    bias: Tensor | None = None,
    lora: tuple[Tensor, Tensor, float] | None = None,
    delta: tuple[Tensor, Tensor, Tensor] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """y (M, n_out) = x (M, K) @ W.T + bias + scaling * t @ B.T + x @ S2.T, validated by the caller.

    lora = (t (M, R), B (n_out, R), scaling); delta = (rows, cols, values) COO of S2 (n_out, K).
    The compute dtype is W's; x may be another float dtype (it is cast tile by tile).
    """
    rows = x.shape[0]
    compute = weight.values.dtype if isinstance(weight, PackedNM) else weight.dtype
    out_dtype = out_dtype or x.dtype
    if rows == 0 or n_out == 0:
        return torch.zeros(rows, n_out, dtype=out_dtype, device=x.device)
    args = _kernel_args(x, weight, n_out, bias, lora, delta, compute)
    if rows <= SKINNY_ROWS or n_out <= NARROW_COLS:
        return _launch_planned(x, args, n_out, out_dtype)
    store_dtype = torch.float32 if host_rounding(out_dtype) else out_dtype
    y = torch.empty(rows, n_out, dtype=store_dtype, device=x.device)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]), 1

    _tiled_kernel[grid](
        *args["pointers"],
        y,
        *args["sizes"],
        triton.next_power_of_2(rows),
        *args["strides"],
        y.stride(0),
        y.stride(1),
        args["scaling"],
        SPLIT_K=1,
        ATOMIC=False,
        **args["flags"],
    )
    return y.to(out_dtype)


def _launch_planned(x: Tensor, args: dict, n_out: int, out_dtype: torch.dtype) -> Tensor:
    rows, k = x.shape
    min_k = 32 if interpreting() else 256
    block_m, block_n, split = plan(rows, n_out, k, sm_count(x.device), min_k)
    atomic = split > 1
    store_dtype = torch.float32 if atomic or host_rounding(out_dtype) else out_dtype
    y = (
        torch.zeros(rows, n_out, dtype=store_dtype, device=x.device)
        if atomic
        else torch.empty(rows, n_out, dtype=store_dtype, device=x.device)
    )
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n_out, block_n), split)
    m_key = rows if rows <= SKINNY_ROWS else triton.next_power_of_2(rows)
    _planned_kernel[grid](
        *args["pointers"],
        y,
        *args["sizes"],
        m_key,
        *args["strides"],
        y.stride(0),
        y.stride(1),
        args["scaling"],
        SPLIT_K=split,
        ATOMIC=atomic,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        GROUP_M=1,
        **args["flags"],
    )
    return y.to(out_dtype)


def _kernel_args(x, weight, n_out, bias, lora, delta, compute: torch.dtype) -> dict:
    """Pointers, sizes, strides and constexpr flags shared by both launch shapes."""
    if isinstance(weight, PackedNM):
        w, idx = weight.values.contiguous(), weight.indices.contiguous()
        w_strides = (w.stride(0), 1, idx.stride(0))
        nm = dict(
            W_FORMAT=1 if weight.along_k else 2,
            NM_N=weight.n,
            NM_M=weight.m,
            INDEX_BITS=weight.index_bits,
            NM_FAST=nm_fast_path(weight.n, weight.m, weight.index_bits),
        )
    else:
        w, idx = weight, None
        w_strides = (w.stride(0), w.stride(1), 0)
        nm = dict(W_FORMAT=0, NM_N=1, NM_M=2, INDEX_BITS=8, NM_FAST=False)
    t, b, scaling = lora if lora is not None else (None, None, 0.0)
    d_rows, d_cols, d_vals = (c.contiguous() for c in delta) if delta is not None else (None,) * 3
    rank = t.shape[1] if t is not None else 0
    nnz = d_rows.numel() if d_rows is not None else 0
    flags = dict(
        nm,
        HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None,
        HAS_DELTA=delta is not None,
        PRECISION=dot_precision(compute),
        UPCAST=upcast_dot(compute),
        BLOCK_R=max(16, min(64, triton.next_power_of_2(rank))),
        BLOCK_E=max(16, min(64, triton.next_power_of_2(nnz))),
    )
    t_strides = (t.stride(0), t.stride(1)) if t is not None else (0, 0)
    b_strides = (b.stride(0), b.stride(1)) if b is not None else (0, 0)
    return {
        "pointers": (x, w, idx, bias, t, b, d_rows, d_cols, d_vals),
        "sizes": (x.shape[0], n_out, x.shape[1], rank, nnz),
        "strides": (x.stride(0), x.stride(1), *w_strides, *t_strides, *b_strides),
        "scaling": float(scaling),
        "flags": flags,
    }

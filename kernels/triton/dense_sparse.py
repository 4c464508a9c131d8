"""K5: DSFormer dense x sparse linear y = (x @ S.T) @ D.T + bias, W = D @ S.

Stage 1 reads S.T (in, k) packed N:M along k and expands it tile by tile (W_FORMAT 2 of the fused
kernel), so only the packed bytes of S move; stage 2 is a dense matmul with D (out, k). As for the
low-rank layer, decode keeps t in fp32 and splits stage 1's reduction across programs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ._common import as_rows, check_runnable
from ._linear import SKINNY_ROWS, PackedNM, fused_linear


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
    """Same contract as `compressor.kernels.ref.dense_sparse_linear`."""
    _in, out_f = _checks.dense_sparse_linear(x, d, s_values, s_indices, n, m, k, bias)
    check_runnable("dense_sparse_linear", x)
    rows = as_rows(x)
    t_dtype = torch.float32 if rows.shape[0] <= SKINNY_ROWS else x.dtype
    s_t = PackedNM(s_values, s_indices, n, m, along_k=False)
    t = fused_linear(rows, s_t, k, out_dtype=t_dtype)
    y = fused_linear(t, d, out_f, bias=bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], out_f)

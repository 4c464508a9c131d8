"""K1/K2: low-rank linear y = (x @ V.T) @ U.T + bias.

Decode (<= 16 rows) is bound by the bytes of U and V. Stage 1 (t = x @ V.T) has only `rank` output
columns, so it splits the K reduction across programs to occupy every SM and keeps t in fp32
(it is tiny); stage 2 streams U with t read from L2. Two light launches instead of one: a single
launch would need a grid-wide barrier between the stages, which Triton does not offer.

Many rows: two tiled tl.dot launches with t stored in x.dtype. A single fused tile cannot hold
t's full rank (up to thousands of columns) in registers, and the round trip of t costs
rows * rank * 2 bytes, small next to the matmul time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ._common import as_rows, check_runnable
from ._linear import SKINNY_ROWS, fused_linear


def low_rank_linear(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Same contract as `compressor.kernels.ref.low_rank_linear`."""
    _in, rank, out_f = _checks.low_rank_linear(x, u, v, bias)
    check_runnable("low_rank_linear", x)
    rows = as_rows(x)
    t_dtype = torch.float32 if rows.shape[0] <= SKINNY_ROWS else x.dtype
    t = fused_linear(rows, v, rank, out_dtype=t_dtype)
    y = fused_linear(t, u, out_f, bias=bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], out_f)

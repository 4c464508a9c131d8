"""K6: LoRA forward y = x @ W.T + bias + scaling * (x @ A.T) @ B.T.

Launch 1 computes t = x @ A.T (rows, r) in fp32 (a narrow output: split-K at small batch).
Launch 2 is the base matmul with the rank-r update and bias added in its epilogue, so y is written
once and W is read once; the adapter adds r * (in + out) weight bytes and one read of x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ._common import as_rows, check_runnable
from ._linear import fused_linear


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    bias: Tensor | None = None,
) -> Tensor:
    """Same contract as `compressor.kernels.ref.lora_linear`."""
    _in, out_f, rank, scaling = _checks.lora_linear(x, weight, lora_a, lora_b, scaling, bias)
    check_runnable("lora_linear", x)
    rows = as_rows(x)
    t = fused_linear(rows, lora_a, rank, out_dtype=torch.float32)
    y = fused_linear(rows, weight, out_f, bias=bias, lora=(t, lora_b, scaling))
    return y.reshape(*x.shape[:-1], out_f)

"""K4: DSEE forward y = x @ W.T + bias + scaling * (x @ A.T) @ B.T + x @ S2.T.

Same two launches as LoRA (t = x @ A.T, then the base matmul with the LoRA update, the sparse delta
and the bias in its epilogue). The base weight is dense (`dsee_linear`) or N:M-packed along
in_features (`dsee_nm_linear`, the pruned backbone DSEE produces). The delta's COO entries are
scanned by every output block (see `_linear`): meant for DSEE's small fixed supports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from ._common import as_rows, check_runnable
from ._linear import PackedNM, fused_linear


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
    """Same contract as `compressor.kernels.ref.dsee_linear`."""
    _in, out_f, _r, scaling = _checks.dsee_linear(
        x, weight, lora_a, lora_b, scaling, delta_rows, delta_cols, delta_values, bias
    )
    check_runnable("dsee_linear", x)
    delta = (delta_rows, delta_cols, delta_values)
    return _dsee(x, weight, out_f, lora_a, lora_b, scaling, delta, bias)


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
    """Same contract as `compressor.kernels.ref.dsee_nm_linear`."""
    out_f, _r, scaling = _checks.dsee_nm_linear(
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
    check_runnable("dsee_nm_linear", x)
    weight = PackedNM(values, indices, n, m, along_k=True)
    delta = (delta_rows, delta_cols, delta_values)
    return _dsee(x, weight, out_f, lora_a, lora_b, scaling, delta, bias)


def _dsee(x, weight, out_f, lora_a, lora_b, scaling, delta, bias) -> Tensor:
    rows = as_rows(x)
    t = fused_linear(rows, lora_a, lora_a.shape[0], out_dtype=torch.float32)
    y = fused_linear(rows, weight, out_f, bias=bias, lora=(t, lora_b, scaling), delta=delta)
    return y.reshape(*x.shape[:-1], out_f)

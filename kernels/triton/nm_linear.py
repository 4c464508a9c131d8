"""K3: N:M semi-structured linear y = x @ W.T + bias from packed values + indices.

W never exists in memory: each tile is expanded in registers from the packed values and the
(preferably bit-packed, 2 bits for 2:4) indices, so a bf16 2:4 weight streams 1.125 bytes per
dense entry instead of 2. See `_linear._nm_gather`.
"""

from __future__ import annotations

from torch import Tensor

from .. import _checks
from ._common import as_rows, check_runnable
from ._linear import PackedNM, fused_linear


def nm_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    n: int,
    m: int,
    in_features: int,
    bias: Tensor | None = None,
) -> Tensor:
    """Same contract as `compressor.kernels.ref.nm_linear`."""
    out_f = _checks.nm_linear(x, values, indices, n, m, in_features, bias)
    check_runnable("nm_linear", x)
    weight = PackedNM(values, indices, n, m, along_k=True)
    y = fused_linear(as_rows(x), weight, out_f, bias=bias)
    return y.reshape(*x.shape[:-1], out_f)

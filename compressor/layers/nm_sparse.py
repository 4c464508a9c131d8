"""`NMSparseLinear`: the packed N:M-sparse layer that `prune` writes (2:4 by default)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.dispatch import compress_nm_indices, nm_linear, pack_nm, unpack_nm
from .base import CompressedLinear, register_layer


@register_layer
class NMSparseLinear(CompressedLinear):
    """y = x W^T + b with W (out, in) N:M-sparse along in_features, stored packed.

    values (out, in/m*n) in the model dtype; indices: each value's position inside its group,
    bit-packed (`compress_nm_indices`, 2 bits for 2:4), a uint8 buffer.
    """

    layer_type = "nm_sparse"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 2,
        m: int = 4,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        self.n, self.m = n, m
        slots = in_features // m * n
        self.values = nn.Parameter(torch.zeros(out_features, slots, dtype=dtype))
        packed = compress_nm_indices(torch.zeros(1, slots, dtype=torch.uint8), m).shape[-1]
        self.register_buffer("indices", torch.zeros(out_features, packed, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_dense(
        cls, weight: Tensor, n: int, m: int, bias: Tensor | None = None
    ) -> NMSparseLinear:
        """Pack an (out, in) weight that already has <= n non-zeros per group of m."""
        layer = cls(weight.shape[1], weight.shape[0], n, m, bias is not None, dtype=weight.dtype)
        values, indices = pack_nm(weight.detach(), n, m)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.indices.copy_(compress_nm_indices(indices, m))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def init_args(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n": self.n,
            "m": self.m,
            "bias": self.bias is not None,
        }

    def dense_weight(self) -> Tensor:
        return unpack_nm(self.values, self.indices, self.n, self.m, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return nm_linear(x, self.values, self.indices, self.n, self.m, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}"

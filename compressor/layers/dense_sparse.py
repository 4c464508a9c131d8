"""`DenseSparseLinear`: the packed inference layer of dsformer, y = (x S^T) D^T + b with W = D S."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.dispatch import compress_nm_indices, dense_sparse_linear, pack_nm, unpack_nm
from .base import CompressedLinear, register_layer


class SparsePattern(Protocol):
    """What packing needs of a column pattern (dsformer's `SparsePattern` provides it)."""

    n: int
    m: int

    @property
    def structured(self) -> bool: ...

    def nnz_per_column(self, k: int) -> int: ...


@register_layer
class DenseSparseLinear(CompressedLinear):
    """W = D S with D (out, k) dense and S (k, in) sparse per column, stored packed.

    N:M (m > 0): S^T (in, k) packed along k as `compressor.kernels.dispatch.pack_nm` lays it out:
    s_values (in, k/m*n) and s_indices = the positions bit-packed by `compress_nm_indices`
    (2 bits each for 2:4); forward runs `compressor.kernels.dispatch.dense_sparse_linear`.
    Unstructured (m == 0): `nnz` entries per column, s_values (in, nnz) and their row ids in k
    (s_indices uint8 if k <= 256 else int16); forward scatters S^T and runs two matmuls.
    """

    layer_type = "dense_sparse"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        n: int = 2,
        m: int = 4,
        nnz: int = 0,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        self.k, self.n, self.m, self.nnz = k, n, m, nnz
        self.d = nn.Parameter(torch.zeros(out_features, k, dtype=dtype))
        if m:
            slots = k // m * n
            packed = compress_nm_indices(torch.zeros(1, slots, dtype=torch.uint8), m).shape[-1]
            index = torch.zeros(in_features, packed, dtype=torch.uint8)
        else:
            slots = nnz
            index = torch.zeros(in_features, nnz, dtype=torch.uint8 if k <= 256 else torch.int16)
        self.s_values = nn.Parameter(torch.zeros(in_features, slots, dtype=dtype))
        self.register_buffer("s_indices", index)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(
        cls, d: Tensor, s: Tensor, pattern: SparsePattern, bias: Tensor | None = None
    ) -> DenseSparseLinear:
        """Pack D (out, k) and S (k, in), S already obeying `pattern` (zeros outside the support)."""
        k, in_f = s.shape
        nnz = 0 if pattern.structured else pattern.nnz_per_column(k)
        layer = cls(in_f, d.shape[0], k, pattern.n, pattern.m, nnz, bias is not None, dtype=d.dtype)
        with torch.no_grad():
            layer.d.copy_(d)
            if pattern.structured:
                values, positions = pack_nm(s.T.contiguous(), pattern.n, pattern.m)
                layer.s_indices.copy_(compress_nm_indices(positions, pattern.m))
            else:
                rows = s.abs().topk(nnz, dim=0).indices.sort(dim=0).values  # (nnz, in)
                values = s.gather(0, rows).T
                layer.s_indices.copy_(rows.T.to(layer.s_indices.dtype))
            layer.s_values.copy_(values)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def sparse_factor(self) -> Tensor:
        """S (k, in) as a dense tensor."""
        return self._sparse_t().T

    def _sparse_t(self) -> Tensor:
        if self.m:
            return unpack_nm(self.s_values, self.s_indices, self.n, self.m, self.k)
        dense = torch.zeros(
            self.in_features, self.k, dtype=self.s_values.dtype, device=self.s_values.device
        )
        return dense.scatter(1, self.s_indices.long(), self.s_values)

    def init_args(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "k": self.k,
            "n": self.n,
            "m": self.m,
            "nnz": self.nnz,
            "bias": self.bias is not None,
        }

    def dense_weight(self) -> Tensor:
        return self.d @ self.sparse_factor()

    def forward(self, x: Tensor) -> Tensor:
        if self.m:
            return dense_sparse_linear(
                x, self.d, self.s_values, self.s_indices, self.n, self.m, self.k, self.bias
            )
        return F.linear(x @ self._sparse_t(), self.d, self.bias)

    def extra_repr(self) -> str:
        pattern = f"{self.n}:{self.m}" if self.m else f"{self.nnz}/col"
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, S={pattern}"

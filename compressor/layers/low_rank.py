"""`LowRankLinear`: the factored layer of the low-rank family (svd, asvd, svd-llm, saes-svd, welore)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch as kernels
from .base import CompressedLinear, register_layer


@register_layer
class LowRankLinear(CompressedLinear):
    """y = (x Vᵀ) Uᵀ + b with U (out, rank) and V (rank, in): W ≈ U V."""

    layer_type = "low_rank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        self.rank = rank
        self.u = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.v = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, dtype=u.dtype, device=u.device)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.bias is not None}

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.low_rank_linear(x, self.u, self.v, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

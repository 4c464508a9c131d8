"""`DseeLinear`: frozen W₀ + (α/r)(B A + S₂), S₂ sparse on a fixed support (see adapters/dsee.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import dispatch as kernels
from .base import CompressedLinear, frozen_zeros, linear_shape, linear_weight, register_layer


def sparse_dense(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """S₂ (out, in) from COO; duplicate coordinates add (the kernels' convention)."""
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return dense.index_put((rows, cols), values, accumulate=True)


@register_layer
class DseeLinear(CompressedLinear):
    """y = x W₀ᵀ + b + (α/r)·[(x Aᵀ) Bᵀ + x S₂ᵀ], S₂ = N values on Ω (two int64 buffers).

    W₀ is frozen (and holds the pruning zeros); A (r, in), B (out, r) and the N values train.
    The forward is `compressor.kernels.dispatch.dsee_linear` (fused Triton on CUDA, torch elsewhere).
    """

    layer_type = "dsee"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 num_sparse: int, bias: bool = False, dtype: torch.dtype | None = None,
                 device=None) -> None:  # fmt: skip
        super().__init__(in_features, out_features)
        self.rank, self.alpha, self.num_sparse = rank, float(alpha), num_sparse
        kw = {"dtype": dtype, "device": device}
        self.weight = frozen_zeros(out_features, in_features, **kw)
        self.bias = frozen_zeros(out_features, **kw) if bias else None
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.delta_values = nn.Parameter(torch.zeros(num_sparse, **kw))
        index = torch.zeros(num_sparse, dtype=torch.int64, device=device)
        self.register_buffer("delta_rows", index)
        self.register_buffer("delta_cols", index.clone())

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, module: nn.Module, support: tuple[Tensor, Tensor], *, rank: int,
                    alpha: float, seed: int) -> DseeLinear:
        """Wrap a linear: W₀ copied, A Kaiming-uniform (seeded), B = 0, S₂ = 0 on `support`."""
        out_f, in_f = linear_shape(module)
        bias, weight = getattr(module, "bias", None), linear_weight(module)
        layer = cls(in_f, out_f, rank, alpha, len(support[0]), bias is not None, weight.dtype,
                    weight.device)
        bound = 1.0 / in_f**0.5  # nn.Linear's kaiming_uniform_(a=√5), as peft initialises lora_A
        lora_a = torch.empty(rank, in_f).uniform_(-bound, bound,
                                                  generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            layer.lora_a.copy_(lora_a)
            layer.delta_rows.copy_(support[0])
            layer.delta_cols.copy_(support[1])
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "alpha": self.alpha, "num_sparse": self.num_sparse,
                "bias": self.bias is not None}

    def sparse_delta(self) -> Tensor:
        """S₂ (out, in), unscaled."""
        shape = (self.out_features, self.in_features)
        return sparse_dense(self.delta_rows, self.delta_cols, self.delta_values, shape)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_b @ self.lora_a + self.sparse_delta())

    def dense_weight(self) -> Tensor:
        return self.weight + self.delta_weight()

    def forward(self, x: Tensor) -> Tensor:
        # The kernel adds x S₂ᵀ unscaled; DSEE scales the whole update (B A + S₂) by α/r.
        return kernels.dsee_linear(x, self.weight, self.lora_a, self.lora_b, self.scaling,
                                   self.delta_rows, self.delta_cols,
                                   self.scaling * self.delta_values, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, num_sparse={self.num_sparse}")

"""`LoraLinear`: the form a trained peft LoRA is kept in when it is not merged.

No peft import: `from_peft` reads a peft layer it is handed (duck-typed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import dispatch as kernels
from .base import CompressedLinear, frozen_zeros, linear_weight, register_layer


@register_layer
class LoraLinear(CompressedLinear):
    """y = x Wᵀ + b + scaling · (x Aᵀ) Bᵀ, W frozen, A (r, in), B (out, r): the form a trained
    peft LoRA is kept in, so checkpoints reload with `compressor.load` and merge with `--merge`."""

    layer_type = "lora"

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float,
                 bias: bool = False, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        self.rank, self.scaling = rank, float(scaling)
        kw = {"dtype": dtype, "device": device}
        self.weight = frozen_zeros(out_features, in_features, **kw)
        self.bias = frozen_zeros(out_features, **kw) if bias else None
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))

    @classmethod
    def from_peft(cls, layer: nn.Module, adapter: str = "default") -> LoraLinear:
        """Copy a peft lora.Linear (base nn.Linear or Conv1D) into a LoraLinear."""
        base = layer.get_base_layer()
        weight = linear_weight(base).detach()
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        new = cls(weight.shape[1], weight.shape[0], a.shape[0], layer.scaling[adapter],
                  base.bias is not None, weight.dtype, weight.device)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.lora_a.copy_(a)
            new.lora_b.copy_(b)
            if base.bias is not None:
                new.bias.copy_(base.bias)
        return new

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "scaling": self.scaling, "bias": self.bias is not None}

    def dense_weight(self) -> Tensor:
        return self.weight + self.scaling * (self.lora_b @ self.lora_a)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.lora_linear(x, self.weight, self.lora_a, self.lora_b, self.scaling,
                                   self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

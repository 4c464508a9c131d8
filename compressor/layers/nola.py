"""`NolaLinear`: a LoRA whose factors are seeded random-basis combinations (see adapters/nola.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import dispatch as kernels
from ._nola_bases import (
    BASES_A,
    BASES_B,
    FIXED,
    kaiming_fixed,
    nola_factors,
    random_bases,
    stream_seed,
)
from .base import (
    CompressedLinear,
    base_weight,
    frozen_zeros,
    is_quantized,
    linear_shape,
    register_layer,
)


@register_layer
class NolaLinear(CompressedLinear):
    """y = x Wᵀ + b + (α/r) · (x Aᵀ) Bᵀ, A and B rebuilt from k + l coefficients and a seed.

    The frozen base is `weight` (out, in), or `base_layer` when it is a bitsandbytes-quantized
    linear (QLoRA-style `load_in`), whose own forward is then used.
    """

    layer_type = "nola"

    def __init__(self, in_features: int, out_features: int, rank: int, num_basis_a: int,
                 num_basis_b: int, alpha: float, seed: int, bias: bool = False,
                 cache_bases: bool = False, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        self.rank, self.alpha, self.seed = rank, float(alpha), int(seed)
        self.num_basis_a, self.num_basis_b, self.cache_bases = num_basis_a, num_basis_b, cache_bases
        kw = {"dtype": dtype, "device": device}
        self.weight = frozen_zeros(out_features, in_features, **kw)
        self.bias = frozen_zeros(out_features, **kw) if bias else None
        self.base_layer: nn.Module | None = None
        self.nola_coef_a = nn.Parameter(torch.zeros(num_basis_a, **kw))
        self.nola_coef_b = nn.Parameter(torch.zeros(num_basis_b, **kw))
        # Non-persistent buffers: regenerated from the seed, never written to a checkpoint.
        for name, value in self._seeded_buffers().items():
            self.register_buffer(name, value.to(**kw), persistent=False)

    def _seeded_buffers(self) -> dict[str, Tensor]:
        seed, rank = self.seed, self.rank
        buffers = {"lora_a_fixed": kaiming_fixed(stream_seed(seed, FIXED), rank, self.in_features)}
        if self.cache_bases:
            buffers["bases_a"] = random_bases(stream_seed(seed, BASES_A), self.num_basis_a, rank * self.in_features)
            buffers["bases_b"] = random_bases(stream_seed(seed, BASES_B), self.num_basis_b, self.out_features * rank)
        return buffers

    def rebuild_buffers(self) -> None:
        """Regenerate the seeded buffers (after a meta-device build, e.g. transformers loading)."""
        device = self.nola_coef_a.device
        for name, value in self._seeded_buffers().items():
            setattr(self, name, value.to(device=device, dtype=self.nola_coef_a.dtype))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, module: nn.Module, *, rank: int, num_basis_a: int, num_basis_b: int,
                    alpha: float, seed: int, cache_bases: bool = False) -> NolaLinear:
        """Wrap a linear (nn.Linear, HF Conv1D or a bitsandbytes linear) as the frozen base."""
        out_f, in_f = linear_shape(module)
        bias = getattr(module, "bias", None)
        quantized = is_quantized(module)
        dtype = torch.float32 if quantized else module.weight.dtype
        layer = cls(in_f, out_f, rank, num_basis_a, num_basis_b, alpha, seed,
                    bias is not None and not quantized, cache_bases, dtype, module.weight.device)
        with torch.no_grad():
            if quantized:
                layer.weight, layer.base_layer = None, module
                layer.bias = module.bias  # shared: to_linear() keeps it, base_layer adds it
            else:
                layer.weight.copy_(base_weight(module).to(dtype))
                if bias is not None:
                    layer.bias.copy_(bias)
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "num_basis_a": self.num_basis_a,
                "num_basis_b": self.num_basis_b, "alpha": self.alpha, "seed": self.seed,
                "bias": self.bias is not None, "cache_bases": self.cache_bases}

    def factors(self) -> tuple[Tensor, Tensor]:
        """A (rank, in), B (out, rank)."""
        bases = (self.bases_a, self.bases_b) if self.cache_bases else None
        return nola_factors(self.nola_coef_a, self.nola_coef_b, self.seed, self.rank,
                            self.in_features, self.out_features, self.lora_a_fixed, bases)

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)

    def dense_weight(self) -> Tensor:
        weight = self.weight if self.base_layer is None else base_weight(self.base_layer)
        return weight + self.delta_weight().to(weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        if self.base_layer is None:
            return kernels.lora_linear(x, self.weight, a, b, self.scaling, self.bias)
        low_rank = nn.functional.linear(nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return self.base_layer(x) + self.scaling * low_rank

    def basis_cache_bytes(self) -> int:
        if not self.cache_bases:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.bases_a, self.bases_b))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, num_basis=({self.num_basis_a}, {self.num_basis_b}), "
                f"seed={self.seed}")

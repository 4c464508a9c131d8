"""Compressed layer classes and their registry, so checkpoints reload by type name.

Each CompressedLinear subclass declares `layer_type`, its JSON-able constructor arguments
(`init_args`), and `dense_weight()` (the (out, in) matrix it represents, used by `--merge`).
Forward passes call `compressor.kernels`, which picks Triton on CUDA and the torch reference
elsewhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

LAYER_TYPES: dict[str, type[CompressedLinear]] = {}


def register_layer(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    if not cls.layer_type:
        raise TypeError(f"{cls.__name__} must set `layer_type`")
    if LAYER_TYPES.get(cls.layer_type, cls) is not cls:
        raise KeyError(f"layer type `{cls.layer_type}` registered twice")
    LAYER_TYPES[cls.layer_type] = cls
    return cls


class CompressedLinear(nn.Module):
    """Base class: a module standing in for an nn.Linear(in_features, out_features)."""

    layer_type: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features

    def init_args(self) -> dict[str, Any]:
        """Constructor kwargs (JSON-able) that rebuild an empty module of the same shapes."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer represents."""
        raise NotImplementedError

    def num_stored_params(self) -> int:
        return sum(t.numel() for t in self.state_dict().values())

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the same outputs (up to rounding)."""
        weight = self.dense_weight().detach()
        bias = getattr(self, "bias", None)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear


def _kernels():
    from compressor import kernels

    return kernels


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
        return _kernels().low_rank_linear(x, self.u, self.v, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def layer_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {type, args}} for every compressed layer (written to compression.json)."""
    return {n: {"type": m.layer_type, "args": m.init_args()} for n, m in compressed_layers(model).items()}


def build_layer(spec: dict[str, Any]) -> CompressedLinear:
    from .errors import ModelError

    kind = spec.get("type")
    if kind not in LAYER_TYPES:
        _import_layer_modules()
    if kind not in LAYER_TYPES:
        raise ModelError(f"unknown compressed layer type `{kind}` in compression.json (known: {sorted(LAYER_TYPES)}); "
                         "upgrade compressor")
    return LAYER_TYPES[kind](**spec.get("args", {}))


def _import_layer_modules() -> None:
    """Layer classes live beside their methods; importing the registry imports them all."""
    from .registry import load_builtin_methods

    load_builtin_methods()


def merge_compressed(model: nn.Module) -> int:
    """Replace every CompressedLinear with an equivalent nn.Linear; returns how many."""
    from .targeting import replace_module

    layers = compressed_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear())
    return len(layers)

"""The CompressedLinear base class, the layer-type table, and helpers for linear-like modules.

Each CompressedLinear subclass declares `layer_type`, its JSON-able constructor arguments
(`init_args`), and `dense_weight()` (the (out, in) matrix it represents, used by `--merge`).
This module imports only torch: the layer kinds (one module each in this package) add the
kernels, and nothing here reaches the method registry, peft or a method module.
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

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the same outputs (up to rounding)."""
        return dense_linear(self.dense_weight().detach(), getattr(self, "bias", None))


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding `weight` (out, in) and `bias`, on weight's device and dtype."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


# -- linear-like modules: nn.Linear, HF's GPT-2 style Conv1D, compressed layers ------------------


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, HF's GPT-2 style Conv1D, and compressor's own factored layers (not a quantized
    embedding table, which is a CompressedLinear only for the checkpoint's layer table)."""
    if getattr(module, "is_lookup", False):
        return False
    return isinstance(module, (nn.Linear, CompressedLinear)) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """W as (out, in) for nn.Linear, Conv1D (stored transposed) and compressed layers."""
    if isinstance(module, CompressedLinear):
        return module.dense_weight()
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return module.weight


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted path `name` for `new`; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def frozen_zeros(*shape: int, dtype=None, device=None) -> nn.Parameter:
    """A frozen parameter of zeros: the base weight or bias slot of an adapter layer."""
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes Linear4bit / Linear8bitLt (a base loaded with `load_in`)."""
    weight = getattr(module, "weight", None)
    return hasattr(weight, "quant_state") or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def base_weight(module: nn.Module) -> torch.Tensor:
    """W (out, in) of a base linear as float, dequantizing bitsandbytes weights."""
    weight = getattr(module, "weight", None)
    state = getattr(module, "state", None)
    if hasattr(weight, "quant_state"):
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if getattr(state, "CB", None) is not None and getattr(state, "SCB", None) is not None:
        import bitsandbytes as bnb

        return bnb.functional.int8_vectorwise_dequant(state.CB, state.SCB).float()
    return linear_weight(module).detach().float()

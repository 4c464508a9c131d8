"""Weight-only quantized layers that `gptq` and `rtn` write: packed b-bit integer codes with one
scale (and, asymmetric, one integer zero point) per group of consecutive input columns.

Storage (shared with the compressed-tensors export and the kernels): `qweight` uint8 (out,
ceil(in·b/8)) codes packed along in_features (`kernels.packing.pack_int`); `scales` (out, in/g) in
the model dtype; `zeros` uint8 (out, in/g) only when asymmetric. The codes and zero points are
buffers (integers, never trained); the scales are a parameter, so `heal` may train them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import dispatch as kernels
from ..kernels.packing import packed_int_bytes
from .base import CompressedLinear, register_layer


def _init_codes(module: nn.Module, prefix: str, rows: int, cols: int, bits: int, group_size: int,
                symmetric: bool, dtype, device) -> None:
    """Empty packed codes, scales and (asymmetric) zero points named `<prefix>qweight`, ..."""
    groups = cols // group_size
    module.register_buffer(f"{prefix}qweight", torch.zeros(rows, packed_int_bytes(cols, bits),
                                                           dtype=torch.uint8, device=device))
    setattr(module, f"{prefix}scales", nn.Parameter(torch.ones(rows, groups, dtype=dtype, device=device)))
    zeros = None if symmetric else torch.zeros(rows, groups, dtype=torch.uint8, device=device)
    module.register_buffer(f"{prefix}zeros", zeros)


def _copy_codes(module: nn.Module, prefix: str, qweight: Tensor, scales: Tensor, zeros: Tensor | None) -> None:
    with torch.no_grad():
        getattr(module, f"{prefix}qweight").copy_(qweight)
        getattr(module, f"{prefix}scales").copy_(scales)
        if zeros is not None:
            getattr(module, f"{prefix}zeros").copy_(zeros)


@register_layer
class QuantLinear(CompressedLinear):
    """y = x Ŵᵀ + (x cvᵀ) cuᵀ + b, Ŵ the dequantized b-bit codes; the low-rank correction
    cu (out, r) · cv (r, in) exists when correction_rank r > 0 (W ≈ Ŵ + cu·cv)."""

    layer_type = "quant"

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 symmetric: bool = True, bias: bool = False, correction_rank: int = 0,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"QuantLinear: group_size={group_size} must divide in_features={in_features}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.correction_rank = correction_rank
        _init_codes(self, "", out_features, in_features, bits, group_size, symmetric, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.cu = self.cv = None
        if correction_rank:
            self.cu = nn.Parameter(torch.zeros(out_features, correction_rank, dtype=dtype, device=device))
            self.cv = nn.Parameter(torch.zeros(correction_rank, in_features, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                   in_features: int, bias: Tensor | None = None,
                   correction: tuple[Tensor, Tensor] | None = None) -> QuantLinear:
        """A layer holding packed codes (`pack_int`), their scales / zero points, an optional bias
        and an optional correction (cu, cv); floats in scales.dtype."""
        rank = 0 if correction is None else correction[0].shape[1]
        layer = cls(in_features, qweight.shape[0], bits, group_size, zeros is None, bias is not None, rank,
                    dtype=scales.dtype, device=scales.device)
        _copy_codes(layer, "", qweight, scales, zeros)
        with torch.no_grad():
            if bias is not None:
                layer.bias.copy_(bias)
            if correction is not None:
                layer.cu.copy_(correction[0])
                layer.cv.copy_(correction[1])
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "bias": self.bias is not None,
                "correction_rank": self.correction_rank}

    def quantized_weight(self) -> Tensor:
        """Ŵ (out, in): the dequantized codes, without the correction."""
        return kernels.dequantize_int(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                      self.in_features)

    def dense_weight(self) -> Tensor:
        weight = self.quantized_weight()
        return weight if self.cu is None else weight + self.cu @ self.cv

    def forward(self, x: Tensor) -> Tensor:
        y = kernels.quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, self.bits,
                                 self.group_size, self.in_features)
        if self.cu is not None:
            y = y + kernels.low_rank_linear(x, self.cu, self.cv)
        return y

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        extra = f", correction_rank={self.correction_rank}" if self.correction_rank else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {grid}{extra}")


@register_layer
class QuantLowRankLinear(CompressedLinear):
    """y = Û (V̂ x) + b: a low-rank layer W ≈ U V with both factors quantized. V (rank, in) has
    groups of `group_size` along in_features, U (out, rank) groups of `u_group_size` along the
    rank; one grid (bits, symmetric) for both."""

    layer_type = "low_rank_quant"

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int = 4, group_size: int = 64,
                 u_group_size: int = 0, symmetric: bool = True, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        u_group_size = u_group_size or rank
        if in_features % group_size or rank % u_group_size:
            raise ValueError(f"QuantLowRankLinear: group sizes {group_size} / {u_group_size} must divide "
                             f"in_features={in_features} / rank={rank}")
        self.rank, self.bits, self.symmetric = rank, bits, symmetric
        self.group_size, self.u_group_size = group_size, u_group_size
        _init_codes(self, "v_", rank, in_features, bits, group_size, symmetric, dtype, device)
        _init_codes(self, "u_", out_features, rank, bits, u_group_size, symmetric, dtype, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, u: QuantLinear, v: QuantLinear, bias: Tensor | None = None) -> QuantLowRankLinear:
        """Join two quantized factors (same grid): v (rank <- in), u (out <- rank)."""
        layer = cls(v.in_features, u.out_features, v.out_features, v.bits, v.group_size, u.group_size,
                    v.symmetric, bias is not None, dtype=v.scales.dtype, device=v.scales.device)
        _copy_codes(layer, "v_", v.qweight, v.scales, v.zeros)
        _copy_codes(layer, "u_", u.qweight, u.scales, u.zeros)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bits": self.bits, "group_size": self.group_size, "u_group_size": self.u_group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None}

    def _factor(self, prefix: str, cols: int, group: int) -> Tensor:
        return kernels.dequantize_int(getattr(self, f"{prefix}qweight"), getattr(self, f"{prefix}scales"),
                                      getattr(self, f"{prefix}zeros"), self.bits, group, cols)

    def dense_weight(self) -> Tensor:
        return self._factor("u_", self.rank, self.u_group_size) @ self._factor("v_", self.in_features, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        t = kernels.quant_linear(x, self.v_qweight, self.v_scales, self.v_zeros, None, self.bits,
                                 self.group_size, self.in_features)
        return kernels.quant_linear(t, self.u_qweight, self.u_scales, self.u_zeros, self.bias, self.bits,
                                    self.u_group_size, self.rank)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}/{self.u_group_size}")


@register_layer
class QuantNMLinear(CompressedLinear):
    """y = x Wᵀ + b with W N:M-sparse along in_features (as `NMSparseLinear`) and its kept values
    quantized: codes packed along the kept values of each row, groups of `group_size` kept values
    (a multiple of n, so a group covers whole N:M groups); `indices` hold the positions unchanged."""

    layer_type = "nm_sparse_quant"

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, bits: int = 4,
                 group_size: int = 64, symmetric: bool = True, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        slots = in_features // m * n
        if in_features % m or slots % group_size:
            raise ValueError(f"QuantNMLinear: group_size={group_size} must divide the {slots} kept values per row")
        self.n, self.m, self.bits, self.group_size, self.symmetric = n, m, bits, group_size, symmetric
        _init_codes(self, "", out_features, slots, bits, group_size, symmetric, dtype, device)
        packed = kernels.compress_nm_indices(torch.zeros(1, slots, dtype=torch.uint8), m).shape[-1]
        self.register_buffer("indices", torch.zeros(out_features, packed, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_codes(cls, qweight: Tensor, scales: Tensor, zeros: Tensor | None, indices: Tensor, n: int, m: int,
                   bits: int, group_size: int, in_features: int, bias: Tensor | None = None) -> QuantNMLinear:
        """Packed codes of the kept values (`pack_int`), their grid, and the bit-packed positions."""
        layer = cls(in_features, qweight.shape[0], n, m, bits, group_size, zeros is None, bias is not None,
                    dtype=scales.dtype, device=scales.device)
        _copy_codes(layer, "", qweight, scales, zeros)
        with torch.no_grad():
            layer.indices.copy_(indices)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "n": self.n, "m": self.m,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "bias": self.bias is not None}

    def values(self) -> Tensor:
        """The dequantized kept values (out, in/m·n)."""
        slots = self.in_features // self.m * self.n
        return kernels.dequantize_int(self.qweight, self.scales, self.zeros, self.bits, self.group_size, slots)

    def dense_weight(self) -> Tensor:
        return kernels.unpack_nm(self.values(), self.indices, self.n, self.m, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return kernels.nm_linear(x, self.values(), self.indices, self.n, self.m, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
                f"bits={self.bits}, group_size={self.group_size}")

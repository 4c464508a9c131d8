"""CPU weight-only int8 / int4 (and int2) linear for decoding: a dequantize-fused GEMV compiled by
inductor, the reference's result to float tolerance.

Why compiled: decoding one token reads every weight once, so a CPU decode step is bound by memory
traffic, and packed codes are 4x (int8) / 8x (int4) fewer bytes than float32. torch's own CPU
weight-only ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) were measured 15-22x
SLOWER than float32 `F.linear` on this project's CPU (issue 19), and the reference
(`dequantize_int` then `F.linear`) writes and re-reads a float copy of the weight on every call.
`torch.compile` (inductor, as torchao does for CPU weight-only int8) fuses unpack, dequantize and
the dot product into one vectorised loop that reads only the packed bytes: with the codes of a
row's group split into their byte slots (slot k of every byte holds input k of each run of 8/b
inputs), y[o] = sum over groups of s[o, g] * sum_j (c[o, j] - z[o, g]) * x[j], all in float32.

Scope: one row of activations (batch-1 decode; prompts and batches are compute-bound, where the
reference's one dequantize per call is amortised), b in {2, 4, 8} (whole codes per byte; 3-bit
codes straddle bytes and take the reference), no autograd (heal trains the scales through the
reference). Every other call returns None and the dispatcher runs the reference.

One compiled function per (bits, group size, shapes, dtype, zero points?, bias?): each gets its
own code object, so dynamo's per-function recompile limit never pushes a model with many layer
shapes back to eager. Compiling costs seconds per key, once per process (inductor also caches the
generated code on disk). If compiling or running fails (no C++ compiler, an unsupported
platform), the failure is warned once and every later call takes the reference.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks

FAST_BITS = (2, 4, 8)
# Why the compiled path is off for this process (set by the first failure), else None.
_broken: str | None = None
_kernels: dict[tuple, Callable] = {}


def quant_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> Tensor | None:
    """The fused GEMV's y, or None when this call is outside its scope (see the module docstring)."""
    if not _in_scope(x, qweight, scales, zeros, bias, bits, group_size, in_features):
        return None
    kernel = _kernel(x, qweight, scales, zeros, bias, bits, group_size, in_features)
    if kernel is None:
        return None
    try:
        y = kernel(x.reshape(1, in_features), qweight, scales, zeros, bias)
    except Exception as error:  # noqa: BLE001 - a compiler failure of any kind means "use the reference"
        _disable(error)
        return None
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _in_scope(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    """What can change between calls of one layer: one row, the dtype, no autograd."""
    return (
        _broken is None
        and bits in FAST_BITS
        and x.dim() > 0
        and x.numel() == in_features
        and x.shape[-1] == in_features
        and x.dtype == scales.dtype
        and isinstance(group_size, int)
        and group_size % (8 // bits) == 0
        and (bias is None or bias.dtype == x.dtype)
        and not (torch.is_grad_enabled() and _any_grad(x, scales, bias))
    )


def _any_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _kernel(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> Callable | None:
    key = (bits, group_size, in_features, tuple(qweight.shape), x.dtype, zeros is not None, bias is not None)
    kernel = _kernels.get(key)
    if kernel is None:
        # Validated once per key with the reference's checks: a call that would fail there goes there.
        try:
            _checks.quant_linear(x, qweight, scales, zeros, bias, bits, group_size, in_features)
        except ValueError:
            return None
        kernel = _kernels[key] = _compile(bits, group_size, key)
    return kernel


def _compile(bits: int, group_size: int, key: tuple) -> Callable:
    """torch.compile of `fused_gemv` for one key, on a fresh copy of its code object."""
    name = "fused_gemv_" + "_".join(str(part).replace("torch.", "") for part in key)
    code = fused_gemv.__code__.replace(co_name=name)
    fresh = types.FunctionType(code, fused_gemv.__globals__, name, (bits, group_size))
    return torch.compile(fresh, dynamic=False, fullgraph=True)


def fused_gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
               bits: int = 4, group_size: int = 64) -> Tensor:
    """y (1, out) = x (1, in) @ dequantize_int(...).T + bias, computed in float32 without forming
    the float weight (written for inductor to fuse; correct eagerly too)."""
    per_byte = 8 // bits
    out_f, groups = scales.shape
    xs = x.to(torch.float32).reshape(groups, group_size // per_byte, per_byte)
    codes = qweight.reshape(out_f, groups, group_size // per_byte)
    offset = zeros.to(torch.float32)[..., None] if zeros is not None else float(2 ** (bits - 1))
    mask = (1 << bits) - 1
    dot = ((codes & mask).to(torch.float32) - offset) * xs[..., 0]
    for k in range(1, per_byte):
        dot = dot + (((codes >> (k * bits)) & mask).to(torch.float32) - offset) * xs[..., k]
    y = (dot.sum(-1) * scales.to(torch.float32)).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(1, out_f).to(x.dtype)


def _disable(error: Exception) -> None:
    global _broken
    _broken = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    warnings.warn(
        f"compressor.kernels: the compiled CPU int8/int4 linear failed ({_broken}); quantized layers "
        "use the reference (dequantize + F.linear) for the rest of this process",
        stacklevel=4,
    )


def compiled_keys() -> list[tuple]:
    """Keys compiled so far in this process (for tests and benchmarks)."""
    return list(_kernels)

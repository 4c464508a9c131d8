"""CPU weight-only int8 / int4 (and int2) linear for decoding: a dequantize-fused GEMV compiled by
inductor, the reference's result to float tolerance.

Why compiled: decoding one token reads every weight once, so a CPU decode step is bound by memory
traffic, and packed codes are 4x (int8) / 8x (int4) fewer bytes than float32. torch's own CPU
weight-only ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) were measured 15-22x
SLOWER than float32 `F.linear` on this project's CPU (issue 19), and the reference
(`dequantize_int` then `F.linear`) writes and re-reads a float copy of the weight on every call.
`torch.compile` (inductor, as torchao does for CPU weight-only int8) fuses unpack, dequantize and
the dot product into one vectorised loop that reads only the packed bytes: y[o] = sum over
groups of s[o, g] * sum_j (c[o, j] - z[o, g]) * x[j], all in float32. The activations are first
split (eagerly, one small copy) into their byte slots, `x_slots[k]` = the inputs whose codes sit at
bits [k·b, (k+1)·b) of each byte, so the compiled loop reads x contiguously: with x read through
a stride-2 view instead, inductor's int4 loop was measured as slow as the eager reference.

Scope: one row of activations (batch-1 decode; prompts and batches are compute-bound, where the
reference's one dequantize per call is amortised), b in {2, 4, 8} (whole codes per byte; 3-bit
codes straddle bytes and take the reference), groups that start on a byte boundary (a group size
that is a multiple of 8/b, or one group per row of any width, e.g. the per-channel rank side of a
quantized low-rank layer: the row's last byte is padded with zero codes, which meet zero inputs),
no autograd (heal trains the scales through the reference). Every other call returns None and the
dispatcher runs the reference.

One compiled function per (bits, group size, shapes, dtype, zero points?, bias?): the function is
traced once with `make_fx` on that key's operands and compiled by `torch._inductor.compile`, and
called directly. Through `torch.compile` the same kernel paid ~86 µs of guard checks and wrapper
per call (measured on this project's 2-core CPU, under load), against ~22 µs called directly: a
decode step makes one call per linear, ~210 for SmolLM2-135M. Without dynamo's guards, every call
checks here what the compiled code assumes (shapes, dtypes, contiguous operands on the CPU), and
anything else takes the reference. Compiling costs seconds per key, once per process (inductor
also caches the generated code on disk). If compiling or running fails (no C++ compiler, an
unsupported platform), the failure is warned once and every later call takes the reference.
"""

from __future__ import annotations

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
    operands = [t for t in (qweight, scales, zeros, bias) if t is not None]
    try:
        y = kernel(byte_slots(x, bits, group_size, scales.shape[1]), *operands)
    except Exception as error:  # noqa: BLE001 - a compiler failure of any kind means "use the reference"
        _disable(error)
        return None
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _in_scope(x, qweight, scales, zeros, bias, bits, group_size, in_features) -> bool:
    """One row, no autograd, and operands exactly as the compiled code reads them."""
    return (
        _broken is None
        and bits in FAST_BITS
        and isinstance(group_size, int)
        and isinstance(in_features, int)
        and group_size > 0
        and (group_size % (8 // bits) == 0 or group_size == in_features)
        and in_features % group_size == 0
        and x.dim() > 0
        and x.numel() == in_features
        and x.shape[-1] == in_features
        and x.dtype == scales.dtype
        and _operands_fit(qweight, scales, zeros, bias, -(-in_features * bits // 8), in_features // group_size)
        and not (torch.is_grad_enabled() and _any_grad(x, scales, bias))
    )


def _operands_fit(qweight, scales, zeros, bias, row_bytes: int, groups: int) -> bool:
    """Contiguous CPU operands of the layout `ref.quant_linear` specifies (dtypes and shapes)."""
    out_f = qweight.shape[0] if qweight.dim() == 2 else -1
    return (
        qweight.dtype == torch.uint8
        and tuple(qweight.shape) == (out_f, row_bytes)
        and tuple(scales.shape) == (out_f, groups)
        and (zeros is None or (zeros.dtype == torch.uint8 and zeros.shape == scales.shape))
        and (bias is None or (bias.dtype == scales.dtype and tuple(bias.shape) == (out_f,)))
        and all(t.is_cpu and t.is_contiguous() for t in (qweight, scales, zeros, bias) if t is not None)
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
        example = [byte_slots(x, bits, group_size, scales.shape[1])]
        example += [t.detach() for t in (qweight, scales, zeros, bias) if t is not None]
        try:
            kernel = _compile(example, bits, group_size, zeros is not None, bias is not None)
        except Exception as error:  # noqa: BLE001 - no compiler, unsupported platform, ...
            _disable(error)
            return None
        _kernels[key] = kernel
    return kernel


def _compile(example: list[Tensor], bits: int, group_size: int, has_zeros: bool, has_bias: bool) -> Callable:
    """`fused_gemv` for operands shaped like `example` (x slots, qweight, scales, [zeros], [bias]),
    traced by make_fx and compiled by inductor: a plain callable, no per-call guards."""
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    def gemv(x_slots: Tensor, qweight: Tensor, scales: Tensor, *rest: Tensor) -> Tensor:
        zeros = rest[0] if has_zeros else None
        bias = rest[-1] if has_bias else None
        return fused_gemv(x_slots, qweight, scales, zeros, bias, bits, group_size)

    with torch.no_grad():
        return inductor_compile(make_fx(gemv)(*example), example)


def byte_slots(x: Tensor, bits: int, group_size: int, groups: int) -> Tensor:
    """One row x (..., in) -> float32 (8/b, groups, ceil(g·b/8)): slot k holds the inputs whose
    codes sit at bits [k·b, (k+1)·b) of each packed byte (inputs k, k + 8/b, ... of every group);
    a single group of a width that fills no whole byte is padded with zero inputs."""
    per_byte = 8 // bits
    row = x.reshape(groups, group_size)
    if group_size % per_byte:  # one group per row (see _in_scope): pad to the row's whole bytes
        row = torch.nn.functional.pad(row, (0, per_byte - group_size % per_byte))
    slots = row.reshape(groups, -1, per_byte).permute(2, 0, 1)
    return slots.to(torch.float32).contiguous()


def fused_gemv(x_slots: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
               bits: int = 4, group_size: int = 64) -> Tensor:
    """y (1, out) = x @ dequantize_int(...).T + bias for x given as `byte_slots(x, ...)`, computed
    in float32 without forming the float weight, returned in scales.dtype (written for inductor to
    fuse; correct eagerly too)."""
    out_f, groups = scales.shape
    codes = qweight.reshape(out_f, groups, -(-group_size * bits // 8))
    offset = zeros.to(torch.float32)[..., None] if zeros is not None else float(2 ** (bits - 1))
    mask = (1 << bits) - 1
    dot = ((codes & mask).to(torch.float32) - offset) * x_slots[0]
    for k in range(1, 8 // bits):
        dot = dot + (((codes >> (k * bits)) & mask).to(torch.float32) - offset) * x_slots[k]
    y = (dot.sum(-1) * scales.to(torch.float32)).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(1, out_f).to(scales.dtype)


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

"""Input validation shared by the reference and the Triton launchers, so both raise the same errors.

Every check raises ValueError naming the op, the parameter in backticks, what was given and what is
expected. Nothing here synchronises with the device (no `.item()`), so the checks are free on GPU.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .packing import check_int_bits, check_nm, nm_index_bits, packed_int_bytes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(op: str, name: str, t: object, ndim: int | None = None) -> Tensor:
    """`t` must be a floating tensor (with `ndim` dims when given)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: `{name}` must be float32/float16/bfloat16/float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def activations(op: str, x: object, in_features: int) -> Tensor:
    """x (..., in_features), at least 1-D."""
    x = tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{op}: `x` must have last dim in_features={in_features}, got shape {tuple(x.shape)}"
        )
    return x


def shape(op: str, name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_dtype_device(op: str, x: Tensor, **others: Tensor | None) -> None:
    """All float operands share x's dtype and device (no silent up/down-casting)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise ValueError(
                f"{op}: `{name}` is {t.dtype} but `x` is {x.dtype}; cast them to one dtype"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")


def bias(op: str, b: object, out_features: int) -> None:
    if b is None:
        return
    tensor(op, "bias", b, ndim=1)
    shape(op, "bias", b, (out_features,))


def scaling(op: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: `scaling` must be a real number, got {value!r}")
    return float(value)


def nm_packed(
    op: str, prefix: str, values: object, indices: object, n: int, m: int, rows: int, cols: int
) -> None:
    """values (rows, cols//m*n) float; indices uint8, one per value or bit-packed."""
    check_nm(n, m, cols, op)
    slots = cols // m * n
    tensor(op, f"{prefix}values", values, ndim=2)
    shape(op, f"{prefix}values", values, (rows, slots))
    if not isinstance(indices, Tensor) or indices.dtype != torch.uint8 or indices.dim() != 2:
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, Tensor) else indices
        raise ValueError(f"{op}: `{prefix}indices` must be a 2-D uint8 tensor, got {got}")
    packed = math.ceil(slots * nm_index_bits(m) / 8)
    if indices.shape[0] != rows or indices.shape[1] not in (slots, packed):
        raise ValueError(
            f"{op}: `{prefix}indices` must have shape ({rows}, {slots}) (one uint8 per value) or "
            f"({rows}, {packed}) (bit-packed), got {tuple(indices.shape)}"
        )
    if indices.device != values.device:
        raise ValueError(
            f"{op}: `{prefix}indices` is on {indices.device}, values on {values.device}"
        )


def integer(op: str, name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{op}: `{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


def coo(op: str, rows: object, cols: object, values: object, x: Tensor) -> None:
    """Sparse delta as COO: rows/cols int64 (nnz,), values (nnz,) with x's dtype and device."""
    for name, t in (("delta_rows", rows), ("delta_cols", cols)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else t
            raise ValueError(f"{op}: `{name}` must be a 1-D int64 tensor, got {got}")
        if t.device != x.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")
    tensor(op, "delta_values", values, ndim=1)
    if not rows.shape == cols.shape == values.shape:
        raise ValueError(
            f"{op}: `delta_rows`, `delta_cols`, `delta_values` must have one length, got "
            f"{tuple(rows.shape)}, {tuple(cols.shape)}, {tuple(values.shape)}"
        )
    same_dtype_device(op, x, delta_values=values)


def lora(op: str, x: Tensor, lora_a: object, lora_b: object, in_f: int, out_f: int) -> int:
    """lora_a (r, in), lora_b (out, r) -> r."""
    tensor(op, "lora_a", lora_a, ndim=2)
    tensor(op, "lora_b", lora_b, ndim=2)
    rank = lora_a.shape[0]
    shape(op, "lora_a", lora_a, (rank, in_f))
    shape(op, "lora_b", lora_b, (out_f, rank))
    same_dtype_device(op, x, lora_a=lora_a, lora_b=lora_b)
    return rank


# -- one validator per op: the reference and the Triton launcher both call these ------------------


def low_rank_linear(x, u, v, bias_) -> tuple[int, int, int]:
    """-> (in_features, rank, out_features)."""
    op = "low_rank_linear"
    tensor(op, "u", u, ndim=2)
    tensor(op, "v", v, ndim=2)
    out_f, rank = u.shape
    if v.shape[0] != rank:
        raise ValueError(
            f"{op}: `u` is (out, rank)={tuple(u.shape)} and `v` must be (rank, in) with "
            f"rank={rank}, "
            f"got {tuple(v.shape)}"
        )
    in_f = v.shape[1]
    activations(op, x, in_f)
    bias(op, bias_, out_f)
    same_dtype_device(op, x, u=u, v=v, bias=bias_)
    return in_f, rank, out_f


def nm_linear(x, values, indices, n, m, in_features, bias_, op="nm_linear") -> int:
    """-> out_features."""
    integer(op, "in_features", in_features, minimum=1)
    tensor(op, "values", values, ndim=2)
    out_f = values.shape[0]
    nm_packed(op, "", values, indices, n, m, out_f, in_features)
    activations(op, x, in_features)
    bias(op, bias_, out_f)
    same_dtype_device(op, x, values=values, bias=bias_)
    return out_f


def dense_sparse_linear(x, d, s_values, s_indices, n, m, k, bias_) -> tuple[int, int]:
    """-> (in_features, out_features)."""
    op = "dense_sparse_linear"
    integer(op, "k", k, minimum=1)
    tensor(op, "d", d, ndim=2)
    out_f = d.shape[0]
    shape(op, "d", d, (out_f, k))
    tensor(op, "s_values", s_values, ndim=2)
    in_f = s_values.shape[0]
    nm_packed(op, "s_", s_values, s_indices, n, m, in_f, k)
    activations(op, x, in_f)
    bias(op, bias_, out_f)
    same_dtype_device(op, x, d=d, s_values=s_values, bias=bias_)
    return in_f, out_f


def lora_linear(x, weight, lora_a, lora_b, scaling_, bias_, op="lora_linear"):
    """-> (in_features, out_features, rank, scaling)."""
    tensor(op, "weight", weight, ndim=2)
    out_f, in_f = weight.shape
    activations(op, x, in_f)
    rank = lora(op, x, lora_a, lora_b, in_f, out_f)
    bias(op, bias_, out_f)
    same_dtype_device(op, x, weight=weight, bias=bias_)
    return in_f, out_f, rank, scaling(op, scaling_)


def dsee_linear(x, weight, lora_a, lora_b, scaling_, rows, cols, values, bias_):
    """-> (in_features, out_features, rank, scaling)."""
    dims = lora_linear(x, weight, lora_a, lora_b, scaling_, bias_, op="dsee_linear")
    coo("dsee_linear", rows, cols, values, x)
    return dims


def dsee_nm_linear(
    x, values, indices, n, m, in_features, lora_a, lora_b, scaling_, rows, cols, delta_values, bias_
):
    """-> (out_features, rank, scaling)."""
    op = "dsee_nm_linear"
    out_f = nm_linear(x, values, indices, n, m, in_features, bias_, op=op)
    rank = lora(op, x, lora_a, lora_b, in_features, out_f)
    coo(op, rows, cols, delta_values, x)
    return out_f, rank, scaling(op, scaling_)


# Counters are int64 inside the kernels; keep offset + numel well inside that range.
MAX_COUNTER = 1 << 62


def mezo(param, seed, offset, scale) -> float:
    """-> scale as float."""
    op = "mezo_axpy_"
    tensor(op, "param", param)
    if not param.is_contiguous():
        raise ValueError(f"{op}: `param` must be contiguous (it is updated through a flat view)")
    integer(op, "seed", seed)
    if seed >= 1 << 63:
        raise ValueError(f"{op}: `seed` must be < 2**63, got {seed}")
    integer(op, "offset", offset)
    if offset + param.numel() > MAX_COUNTER:
        raise ValueError(f"{op}: `offset` + numel must be <= 2**62, got {offset + param.numel()}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{op}: `scale` must be a real number, got {scale!r}")
    return float(scale)


def int_quantized(op: str, qweight, scales, zeros, bits, group_size, in_features) -> int:
    """Packed codes (out, ceil(in·b/8)) uint8, scales (out, in/g) float, zeros None or uint8
    (out, in/g) -> out_features."""
    check_int_bits(bits, op)
    integer(op, "in_features", in_features, minimum=1)
    integer(op, "group_size", group_size, minimum=1)
    if in_features % group_size:
        raise ValueError(f"{op}: `group_size`={group_size} must divide in_features={in_features}")
    if not isinstance(qweight, Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, Tensor) else qweight
        raise ValueError(f"{op}: `qweight` must be a 2-D uint8 tensor, got {got}")
    out_f = qweight.shape[0]
    shape(op, "qweight", qweight, (out_f, packed_int_bytes(in_features, bits)))
    tensor(op, "scales", scales, ndim=2)
    shape(op, "scales", scales, (out_f, in_features // group_size))
    if zeros is not None:
        if not isinstance(zeros, Tensor) or zeros.dtype != torch.uint8:
            raise ValueError(f"{op}: `zeros` must be None (symmetric) or a uint8 tensor, got {zeros!r}")
        shape(op, "zeros", zeros, tuple(scales.shape))
    for name, t in (("qweight", qweight), ("zeros", zeros)):
        if t is not None and t.device != scales.device:
            raise ValueError(f"{op}: `{name}` is on {t.device}, `scales` on {scales.device}")
    return out_f


def quant_linear(x, qweight, scales, zeros, bias_, bits, group_size, in_features) -> int:
    """-> out_features."""
    op = "quant_linear"
    out_f = int_quantized(op, qweight, scales, zeros, bits, group_size, in_features)
    activations(op, x, in_features)
    bias(op, bias_, out_f)
    same_dtype_device(op, x, scales=scales, bias=bias_)
    return out_f

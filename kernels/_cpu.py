"""The reference ops on the per-call hot path (CPU inference), without the per-call overhead.

Decoding calls every compressed linear once per token with a single row, so Python work that
`nn.Linear` does not do shows up directly in tokens/s. These functions compute exactly what
`ref.<op>` computes (the same torch calls in the same order), but validate only what can change
between calls of one layer — the activations' last dim and dtype — and hand anything unexpected to
`ref.<op>`, whose full checks then raise the specified error. They create no copy of the factors:
the matmuls read U and V in their stored (out, rank) / (rank, in) layout (measured on this
project's CPU target: pre-transposed (in, out) copies are not faster for decode-sized matmuls, and
would double the factors' memory).

N:M weights have no CPU sparse kernel in torch, so `nm_linear` and `dense_sparse_linear` unpack
the packed values to a dense matrix on every call: cheap next to a long prompt, but the dominant
cost of a one-token decode step. Inside `compressor.kernels.cached_unpack()` the unpacked matrix is
kept (per packed tensor, invalidated when it is modified in place) and reused: dense speed at the
price of holding the dense matrix as well as the packed one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import ref
from .packing import unpack_nm


def _plain(x: Tensor, weight: Tensor, in_features: int, bias: Tensor | None) -> bool:
    """True when x (a CPU tensor) can go straight into the matmuls: the weights' dtype and
    device, the right width, a bias of the same dtype."""
    return (
        x.dtype == weight.dtype
        and weight.is_cpu
        and x.dim() > 0
        and x.shape[-1] == in_features
        and (bias is None or bias.dtype == x.dtype)
    )


def low_rank_linear(x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    if not (_plain(x, v, v.shape[-1], bias) and u.dtype == v.dtype and u.is_cpu):
        return ref.low_rank_linear(x, u, v, bias)
    return F.linear(F.linear(x, v), u, bias)


def nm_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    n: int,
    m: int,
    in_features: int,
    bias: Tensor | None,
    cache: WeakIdKeyDictionary | None,
) -> Tensor:
    if not _plain(x, values, in_features, bias):
        return ref.nm_linear(x, values, indices, n, m, in_features, bias)
    weight = unpacked(values, indices, n, m, in_features, cache)
    return F.linear(x, weight, bias)


def dense_sparse_linear(
    x: Tensor,
    d: Tensor,
    s_values: Tensor,
    s_indices: Tensor,
    n: int,
    m: int,
    k: int,
    bias: Tensor | None,
    cache: WeakIdKeyDictionary | None,
) -> Tensor:
    if not (_plain(x, s_values, s_values.shape[0], bias) and d.dtype == x.dtype):
        return ref.dense_sparse_linear(x, d, s_values, s_indices, n, m, k, bias)
    s_t = unpacked(s_values, s_indices, n, m, k, cache)  # (in, k)
    return F.linear(x @ s_t, d, bias)


def unpacked(
    values: Tensor, indices: Tensor, n: int, m: int, cols: int, cache: WeakIdKeyDictionary | None
) -> Tensor:
    """`unpack_nm(values, indices, ...)`, reused from `cache` while neither tensor has changed."""
    if cache is None or not _cacheable(values, indices):
        return unpack_nm(values, indices, n, m, cols)
    key = (indices, values._version, indices._version, n, m, cols)
    hit = cache.get(values)
    if hit is not None and hit[0][0] is indices and hit[0][1:] == key[1:]:
        return hit[1]
    dense = unpack_nm(values, indices, n, m, cols)
    cache[values] = (key, dense)
    return dense


def _cacheable(values: Tensor, indices: Tensor) -> bool:
    """Inference tensors have no version counter, and a cached matrix must not carry autograd
    history (training steps change the values and need the graph)."""
    if values.is_inference() or indices.is_inference():
        return False
    return not (torch.is_grad_enabled() and values.requires_grad)

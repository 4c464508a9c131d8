"""Fused kernels for compressed linear layers, with a pure-torch reference for each.

Every op exists twice with one signature: `compressor.kernels.ref.<op>` (the specification, any
device, differentiable) and `compressor.kernels.triton.<op>` (forward-only GPU kernels). The
functions here add `backend=` and dispatch:

1. an explicit `backend` argument ("ref", "triton" or "auto") wins;
2. else the environment variable COMPRESSOR_KERNELS (same values);
3. else "auto": Triton when the tensors are on CUDA, Triton imports and no autograd graph is being
   recorded through the inputs (the kernels have no backward); the reference otherwise.

Triton is imported only when the Triton backend is chosen, so `import compressor.kernels` works
without it. Asking for Triton when it cannot be imported raises `KernelUnavailable`. Asking for it
while an input requires grad raises too when the `backend` argument asked; when COMPRESSOR_KERNELS
asked, that call uses the reference instead (warned once), so training still runs under the
variable set for inference. On CPU tensors the Triton backend runs only under TRITON_INTERPRET=1
(how the tests exercise the kernels).

N:M helpers (`pack_nm`, `unpack_nm`, `nm_mask`, ...) are plain torch and take no backend.

CPU inference: when the reference is the answer (CPU tensors, no `backend` argument, the variable
unset / "auto" / "ref"), `low_rank_linear`, `nm_linear` and `dense_sparse_linear` skip the backend
resolution and the operand checks that cannot change between calls of one layer (`_cpu`): same
torch calls as `ref`, same result. `cached_unpack()` keeps unpacked N:M weights between calls.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _cpu, ref
from .errors import INSTALL_HINT, KernelUnavailable
from .packing import (
    compress_nm_indices,
    expand_nm_indices,
    nm_index_bits,
    nm_mask,
    pack_nm,
    unpack_nm,
)
from .ref import mezo_normal

__all__ = [
    "KernelUnavailable",
    "available_backends",
    "cached_unpack",
    "compress_nm_indices",
    "dense_sparse_linear",
    "dsee_linear",
    "dsee_nm_linear",
    "expand_nm_indices",
    "lora_linear",
    "low_rank_linear",
    "mezo_axpy_",
    "mezo_normal",
    "nm_index_bits",
    "nm_linear",
    "nm_mask",
    "pack_nm",
    "resolve_backend",
    "unpack_nm",
]

ENV_VAR = "COMPRESSOR_KERNELS"
_CHOICES = ("ref", "triton", "auto")
# Set after the first env-var autograd fallback: every training step would repeat the warning.
_warned_env_autograd = False
# Values of COMPRESSOR_KERNELS under which CPU tensors always get the reference.
_REFERENCE_ON_CPU = (None, "", "auto", "ref")
# Unpacked N:M weights by packed-values tensor, while `cached_unpack()` is active; else None.
_unpack_cache: WeakIdKeyDictionary | None = None


def _cpu_reference(x: Tensor) -> bool:
    """True when the op on CPU tensor `x` resolves to the reference without an explicit backend:
    the fast path's precondition (read per call, so changing the variable takes effect at once)."""
    return isinstance(x, Tensor) and x.is_cpu and os.environ.get(ENV_VAR) in _REFERENCE_ON_CPU


@contextlib.contextmanager
def cached_unpack() -> Iterator[None]:
    """Inside this block the reference N:M ops (CPU inference) unpack each packed weight once and
    reuse the dense matrix until the packed tensors change; the matrices are freed on exit.

    Decode-speed for memory: an N:M layer then runs at dense speed on CPU but holds its dense
    weight beside the packed one. Nested blocks share the outermost cache."""
    global _unpack_cache
    outer = _unpack_cache
    if outer is None:
        _unpack_cache = WeakIdKeyDictionary()
    try:
        yield
    finally:
        if outer is None:
            _unpack_cache = None


def _triton_import_error() -> Exception | None:
    """None if the `triton` package imports, else the ImportError (not cached: tests patch it)."""
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return error
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> list[str]:
    """Backends that can run here: "ref", plus "triton" if it imports and CUDA (or the CPU
    interpreter, TRITON_INTERPRET=1) is available."""
    backends = ["ref"]
    if _triton_import_error() is None and (torch.cuda.is_available() or _interpreting()):
        backends.append("triton")
    return backends


def resolve_backend(backend: str | None = None, *tensors: Tensor | None) -> str:
    """Pick "ref" or "triton" for an op on `tensors` (argument > COMPRESSOR_KERNELS > auto)."""
    source = "`backend`"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    choice = backend.strip().lower() if isinstance(backend, str) else backend
    if choice not in _CHOICES:
        raise ValueError(
            f"compressor.kernels: {source} must be one of {list(_CHOICES)}, got {backend!r}"
        )
    present = [t for t in tensors if isinstance(t, Tensor)]
    if choice == "auto":
        return "triton" if _auto_wants_triton(present) else "ref"
    if choice == "triton":
        _require_triton(source)
        if _needs_grad(present):
            return _autograd_fallback(source)
    return choice


def _needs_grad(tensors: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _auto_wants_triton(tensors: list[Tensor]) -> bool:
    on_cuda = any(t.is_cuda for t in tensors)
    return on_cuda and not _needs_grad(tensors) and _triton_import_error() is None


def _require_triton(source: str) -> None:
    error = _triton_import_error()
    if error is not None:
        raise KernelUnavailable(
            f"compressor.kernels: {source} asks for the Triton backend but `triton` cannot be "
            f"imported ({type(error).__name__}: {error}); install it with `{INSTALL_HINT}` or use "
            f"backend='ref'"
        )


def _autograd_fallback(source: str) -> str:
    """Triton was asked for but an input requires grad. An explicit argument is a request for
    this call, so it fails loudly; the environment variable is a global preference that also
    covers training code, so that call falls back to the differentiable reference."""
    global _warned_env_autograd
    if source != ENV_VAR:
        raise KernelUnavailable(
            f"compressor.kernels: {source} asks for the Triton backend, but the Triton kernels are "
            "forward-only and an input requires grad; run under torch.no_grad() or use "
            "backend='ref'"
        )
    if not _warned_env_autograd:
        _warned_env_autograd = True
        warnings.warn(
            f"compressor.kernels: {ENV_VAR}=triton, but the Triton kernels are forward-only; the "
            "pure-torch reference is used for calls whose inputs require grad (autograd)",
            stacklevel=5,  # past resolve_backend and _backend_module: the public op's caller
        )
    return "ref"


def _backend_module(backend: str | None, *tensors: Tensor | None) -> ModuleType:
    if resolve_backend(backend, *tensors) == "ref":
        return ref
    return importlib.import_module(".triton", __package__)


# -- public ops: same arguments as ref.<op>, plus `backend` ----------------------------------------


def low_rank_linear(
    x: Tensor, u: Tensor, v: Tensor, bias: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """y = (x @ v.T) @ u.T + bias; x (..., in), v (rank, in), u (out, rank). See `ref`."""
    if backend is None and _cpu_reference(x):
        return _cpu.low_rank_linear(x, u, v, bias)
    return _backend_module(backend, x, u, v, bias).low_rank_linear(x, u, v, bias)


def nm_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    n: int,
    m: int,
    in_features: int,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """y = x @ W.T + bias, W (out, in_features) N:M-packed along in_features. See `ref`."""
    if backend is None and _cpu_reference(x):
        return _cpu.nm_linear(x, values, indices, n, m, in_features, bias, _unpack_cache)
    impl = _backend_module(backend, x, values, bias)
    return impl.nm_linear(x, values, indices, n, m, in_features, bias)


def dense_sparse_linear(
    x: Tensor,
    d: Tensor,
    s_values: Tensor,
    s_indices: Tensor,
    n: int,
    m: int,
    k: int,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """DSFormer y = (x @ S.T) @ D.T + bias; S.T (in, k) packed along k. See `ref`."""
    if backend is None and _cpu_reference(x):
        return _cpu.dense_sparse_linear(x, d, s_values, s_indices, n, m, k, bias, _unpack_cache)
    impl = _backend_module(backend, x, d, s_values, bias)
    return impl.dense_sparse_linear(x, d, s_values, s_indices, n, m, k, bias)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """y = x @ W.T + bias + scaling * (x @ A.T) @ B.T. See `ref.lora_linear`."""
    impl = _backend_module(backend, x, weight, lora_a, lora_b, bias)
    return impl.lora_linear(x, weight, lora_a, lora_b, scaling, bias)


def dsee_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    delta_rows: Tensor,
    delta_cols: Tensor,
    delta_values: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """y = x @ W.T + bias + scaling * (x @ A.T) @ B.T + x @ S2.T, S2 in COO. See `ref`."""
    impl = _backend_module(backend, x, weight, lora_a, lora_b, delta_values, bias)
    return impl.dsee_linear(
        x, weight, lora_a, lora_b, scaling, delta_rows, delta_cols, delta_values, bias
    )


def dsee_nm_linear(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    n: int,
    m: int,
    in_features: int,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    delta_rows: Tensor,
    delta_cols: Tensor,
    delta_values: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """`dsee_linear` with an N:M-packed base weight. See `ref.dsee_nm_linear`."""
    impl = _backend_module(backend, x, values, lora_a, lora_b, delta_values, bias)
    return impl.dsee_nm_linear(
        x,
        values,
        indices,
        n,
        m,
        in_features,
        lora_a,
        lora_b,
        scaling,
        delta_rows,
        delta_cols,
        delta_values,
        bias,
    )


def mezo_axpy_(
    param: Tensor, seed: int, offset: int, scale: float, backend: str | None = None
) -> None:
    """In place param += scale * z(seed, offset); z is `mezo_normal`. See `ref.mezo_axpy_`.

    The update is applied under no_grad whatever the backend, so parameters may require grad.
    """
    with torch.no_grad():
        _backend_module(backend, param.detach()).mezo_axpy_(param, seed, offset, scale)

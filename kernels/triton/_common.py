"""Host-side helpers shared by the Triton launchers: device checks, SM count, autotune configs."""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from ..errors import KernelUnavailable

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Pretend SM count under the CPU interpreter: small, so tiny test shapes also reach split-K.
INTERPRETER_SMS = 4


def interpreting() -> bool:
    """True when TRITON_INTERPRET is on, i.e. kernels run in numpy on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(op: str, x: Tensor) -> None:
    """Raise unless x is fp32/fp16/bf16 and on CUDA (or on CPU under the interpreter)."""
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{op}: the Triton kernels support float32/float16/bfloat16, got `x` {x.dtype}; "
            "use backend='ref' for float64"
        )
    if x.is_cuda or (x.device.type == "cpu" and interpreting()):
        return
    raise KernelUnavailable(
        f"{op}: the Triton backend runs on CUDA tensors, got `x` on {x.device} (CPU tensors "
        "run only under TRITON_INTERPRET=1, for tests); use backend='ref'"
    )


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (INTERPRETER_SMS under the interpreter)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """Autotune candidates; a single small config under the interpreter (no benchmarking there).

    COMPRESSOR_TRITON_AUTOTUNE=0 keeps only the first GPU config: no autotuning, a fraction of the
    compile time (for a short GPU session; timings are then those of an untuned launch)."""
    if interpreting():
        return [interpreted]
    return gpu[:1] if os.environ.get("COMPRESSOR_TRITON_AUTOTUNE", "1") == "0" else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (as F.linear without TF32); 16-bit ones are exact."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """True where bf16 maths must run in fp32: the Triton 3.9 interpreter does bf16 arithmetic on
    the raw uint16 bits and truncates fp32 -> bf16 casts. Products of bf16 values are exact in
    fp32, so dots agree with the GPU; only the GPU's rounding of intermediates to bf16 is
    skipped."""
    return interpreting() and dtype == torch.bfloat16


def host_rounding(dtype: torch.dtype) -> bool:
    """Whether a bf16 output must be written as fp32 and rounded by torch (interpreter only)."""
    return upcast_dot(dtype)


def as_rows(x: Tensor) -> Tensor:
    """(..., features) -> (rows, features), a view when possible."""
    return x.reshape(-1, x.shape[-1])

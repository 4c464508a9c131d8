"""Fixtures for the kernel tests: tolerances, random N:M matrices, error measure.

TRITON_INTERPRET must be on before any `@triton.jit` runs when there is no GPU; tests/conftest.py
sets it, and this file repeats the setdefault so `pytest tests/kernels` works on its own.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Max |y - exact| / max |exact| against fp64 maths on the same (already rounded) inputs. The
# output's own rounding is up to u = 2**-8 (bf16) / 2**-11 (fp16) / 2**-24 (fp32), and 16-bit
# paths also round intermediates such as t = x @ V.T to the dtype: measured worst cases are about
# 2u; the tolerances leave 3-6x headroom (fp32 ~40x: accumulation order varies by launch plan).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2, torch.float64: 1e-12}


def relative_max_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    """max |y - exact| / max |exact| (both as float64)."""
    scale = exact.abs().max().clamp_min(1e-30)
    return float((y.double() - exact.double()).abs().max() / scale)


def random_nm(rows: int, cols: int, n: int, m: int, dtype=torch.float32, generator=None):
    """Dense (rows, cols) with exactly n non-zeros per group of m along the last dim."""
    from compressor.kernels.dispatch import nm_mask

    dense = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    dense = dense.masked_fill(dense == 0, 1.0)
    return (dense * nm_mask(torch.rand(rows, cols, generator=generator), n, m)).to(dtype)


@pytest.fixture
def tolerance():
    return TOLERANCE


@pytest.fixture
def max_error():
    return relative_max_error


@pytest.fixture
def nm_dense():
    return random_nm


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)

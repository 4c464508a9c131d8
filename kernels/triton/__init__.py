"""Triton implementations: same names and signatures as `compressor.kernels.ref`, forward-only.

Importing this package imports Triton; `compressor.kernels` does so only when this backend is
chosen. Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

from .dense_sparse import dense_sparse_linear
from .dsee import dsee_linear, dsee_nm_linear
from .lora import lora_linear
from .low_rank import low_rank_linear
from .mezo import mezo_axpy_
from .nm_linear import nm_linear
from .quant_linear import quant_linear

__all__ = [
    "dense_sparse_linear",
    "dsee_linear",
    "dsee_nm_linear",
    "lora_linear",
    "low_rank_linear",
    "mezo_axpy_",
    "nm_linear",
    "quant_linear",
]

"""rtn: round-to-nearest weight-only quantization, the data-free baseline of `gptq`.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/rtn.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .quant import QuantFields


@dataclass(frozen=True, kw_only=True)
class RTNConfig(QuantFields, method="rtn", kind="compress", apply="compressor.methods.rtn"):
    """Round-to-nearest weight-only quantization (see QuantFields for bits, group_size, symmetric)."""

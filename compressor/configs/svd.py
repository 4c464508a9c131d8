"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, the data-free baseline of the low-rank family.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/svd.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .lowrank import LowRankConfig


@dataclass(frozen=True, kw_only=True)
class SVDConfig(LowRankConfig, method="svd", kind="compress", apply="compressor.methods.svd"):
    """Plain truncated SVD of every targeted linear (see LowRankConfig for the shared fields)."""

"""SAES-SVD: CEALC (cumulative-error-aware closed form) + ACES (per-layer β search).

Its config (see compressor/configs/__init__.py); the method is compressor/methods/saes_svd.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .lowrank import CalibratedLowRankConfig


@dataclass(frozen=True, kw_only=True)
class SAESConfig(CalibratedLowRankConfig,
                 method="saes-svd", kind="compress", apply="compressor.methods.saes_svd"):
    """SAES-SVD (see CalibratedLowRankConfig for the shared fields).

    Args:
        beta: fixed β ∈ [0, 1) for every layer, or null for the ACES per-layer search.
        beta_min, beta_max: the interval ACES searches (the paper's exact caps are unverified;
            0.2 and 0.428571 = α 0.75 come from the reproduction).
        damping: absolute λ added to the diagonal of H = X Xᵀ/N before Cholesky.
    """

    supports_aware_allocation: ClassVar[bool] = True
    beta: float | None = None
    beta_min: float = 0.2
    beta_max: float = 0.428571
    damping: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta is not None and not 0 <= self.beta < 1:
            raise ConfigError(
                f"saes-svd: `beta` must be in [0, 1) or null (ACES search), got {self.beta!r}"
            )
        if not 0 <= self.beta_min <= self.beta_max < 1:
            raise ConfigError(
                f"saes-svd: need 0 ≤ `beta_min` ≤ `beta_max` < 1, got [{self.beta_min}, {self.beta_max}]"
            )
        if not self.damping >= 0:
            raise ConfigError(f"saes-svd: `damping` must be ≥ 0, got {self.damping!r}")

"""ASVD: activation-aware SVD — scale input channels by their typical magnitude before truncating.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/asvd.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .lowrank import CalibratedLowRankConfig


@dataclass(frozen=True, kw_only=True)
class ASVDConfig(CalibratedLowRankConfig,
                 method="asvd", kind="compress", apply="compressor.methods.asvd"):
    """ASVD (see CalibratedLowRankConfig for the shared fields).

    Args:
        alpha: exponent α of the activation scale s_j = (mean |x_j|)^α; 0 = plain SVD, the paper
            uses 0.5.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 2:
            raise ConfigError(
                f"asvd: `alpha` must be in [0, 2], got {self.alpha!r}; the paper uses 0.5"
            )

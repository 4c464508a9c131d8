"""WeLore: non-uniform ranks from each matrix's normalised singular-value tail.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/welore.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .lowrank import LowRankConfig


@dataclass(frozen=True, kw_only=True)
class WeLoreConfig(LowRankConfig,
                   method="welore", kind="compress", apply="compressor.methods.welore"):
    """WeLore (see LowRankConfig: `rank` is the keep ratio, `min_ratio` the LRC threshold).

    Args:
        allocation: always `welore` for this stage (other methods accept `allocation: welore`).
    """

    allocation: str = "welore"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.allocation != "welore":
            raise ConfigError(
                f"welore: `allocation` must be `welore`, got {self.allocation!r}; "
                "for uniform ranks use the `svd` method"
            )

"""SVD-LLM: truncation-aware data whitening (+ optional least-squares update of U).

Its config (see compressor/configs/__init__.py); the method is compressor/methods/svd_llm.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..errors import ConfigError
from .lowrank import CalibratedLowRankConfig

UPDATE_AUTO_BELOW = 0.7


@dataclass(frozen=True, kw_only=True)
class SVDLLMConfig(CalibratedLowRankConfig,
                   method="svd-llm", kind="compress", apply="compressor.methods.svd_llm"):
    """SVD-LLM whitening (see CalibratedLowRankConfig for the shared fields).

    Args:
        update: least-squares update of U against the full-precision outputs: `false` (default,
            whitening only; the update measured worse, see the module docstring), `true`, or
            `auto` (on when rank < 0.7, the reference code's rule).
        damping: absolute ridge λ added to H's diagonal before Cholesky (0 = the paper's whitening;
            the eigen-shift fallback still guards non-definite H).
    """

    supports_aware_allocation: ClassVar[bool] = True
    update: Literal["auto", "true", "false"] | bool = "false"
    damping: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.update, bool):
            object.__setattr__(self, "update", "true" if self.update else "false")
        if self.update not in ("auto", "true", "false"):
            raise ConfigError(f"svd-llm: `update` must be auto, true or false, got {self.update!r}")
        if not self.damping >= 0:
            raise ConfigError(f"svd-llm: `damping` must be ≥ 0, got {self.damping!r}")

    def use_update(self) -> bool:
        return self.update == "true" or (self.update == "auto" and self.rank < UPDATE_AUTO_BELOW)

"""`analyze`: one SVD sweep over the selected linears — spectra, κ (KappaTune), effective and
stable rank, WeLore's normalised tail, the ranks WeLore would remove and its LRC/N-LRC verdict.

Its config (see compressor/configs/__init__.py); the method is compressor/analysis/analyze.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import ConfigError

KAPPA_EPS = 1e-8  # peft's KappaTuneSelector and the paper's experiments: s0 / (s_last + 1e-8)


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig(MethodConfig,
                    method="analyze", kind="analyze", apply="compressor.analysis.analyze"):
    """Args:
        top_p: KappaTune selects the lowest-κ fraction of tensors (paper and peft default 0.2).
        welore_reduction: the total rank reduction WeLore targets; τ is found by bisection.
        lrc_min_ratio: a matrix is a low-rank component when more than this fraction of its rank
            is removed (WeLore's continual fine-tuning default, 0.5).
        max_dim: skip tensors with a dimension above this (KappaTune's 16384 default).
        kappa_eps: κ = σmax / (σmin + eps).
        use_cache: reuse spectra cached from an earlier run on identical weights.
    """

    top_p: float = 0.2
    welore_reduction: float = 0.5
    lrc_min_ratio: float = 0.5
    max_dim: int = 16384
    kappa_eps: float = KAPPA_EPS
    use_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"analyze: `top_p` must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.welore_reduction < 1.0:
            raise ConfigError(f"analyze: `welore_reduction` must be in [0, 1), got {self.welore_reduction}")
        if not 0.0 <= self.lrc_min_ratio < 1.0:
            raise ConfigError(f"analyze: `lrc_min_ratio` must be in [0, 1), got {self.lrc_min_ratio}")

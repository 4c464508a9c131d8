"""prune: N:M (default 2:4) or unstructured pruning by magnitude, Wanda or SparseGPT.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/prune.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import CalibrationConfig
from ..errors import ConfigError
from .patterns import parse_nm


@dataclass(frozen=True, kw_only=True)
class PruneConfig(CalibrationConfig,
                  method="prune", kind="compress", apply="compressor.methods.prune"):
    """Args:
    pattern: "N:M" (e.g. "2:4": N kept of every M consecutive weights along in_features of each
        row, stored packed) or "unstructured" (the `sparsity` fraction of weights zeroed).
    sparsity: fraction of weights removed by `unstructured`, in [0, 1). N:M removes 1 - N/M.
    score: "magnitude" (|W|, data-free), "wanda" (|W| * input feature norm; calibrated) or
        "sparsegpt" (calibrated; the mask is chosen by the OBS saliency w²/[H⁻¹]_cc² as columns
        are reached, and the kept weights are updated to compensate the removed ones).
    group: which weights compete for `unstructured`: "row" (each output row loses the same
        fraction; Wanda's rule), "layer" (the whole matrix), or "auto" (row for wanda, layer for
        magnitude, and for sparsegpt the paper's rule: every `block_size`-column block loses
        `sparsity` of its weights; sparsegpt accepts only "auto").
    block_size: sparsegpt: columns per lazy-update block (the paper's 128).
    dampening: sparsegpt: λ added to diag(H) as a fraction of its mean (the paper's 0.01).
    num_windows: calibration windows for `wanda`/`sparsegpt`.
    """

    pattern: str = "2:4"
    sparsity: float = 0.5
    score: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    group: Literal["auto", "row", "layer"] = "auto"
    block_size: int = 128
    dampening: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_nm(self.pattern)
        except ValueError as err:
            raise ConfigError(f"prune: `pattern` {err}") from None
        if not 0 <= self.sparsity < 1:
            raise ConfigError(
                f"prune: `sparsity` is the fraction of weights removed and must be in [0, 1), got "
                f"{self.sparsity!r}; e.g. `sparsity: 0.5`"
            )
        if self.score == "sparsegpt" and self.group != "auto":
            raise ConfigError(
                f"prune: `group`={self.group!r} does not apply to `score: sparsegpt`, which ranks the "
                "weights of each column block together (the paper's rule); drop `group`"
            )
        if not 0 <= self.dampening < 10 or isinstance(self.dampening, bool):
            raise ConfigError(
                f"prune: `dampening` is a fraction of the mean Hessian diagonal and must be in "
                f"[0, 10), got {self.dampening!r}; the paper uses 0.01"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"prune: `block_size` must be a positive integer, got {self.block_size!r}")

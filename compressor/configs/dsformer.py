"""dsformer: dense x sparse factorization W ~ D S (N:M-sparse S), refined by straight-through training.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/dsformer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import CalibrationConfig
from ..errors import ConfigError
from .patterns import parse_nm


@dataclass(frozen=True, kw_only=True)
class DSFormerConfig(CalibrationConfig,
                     method="dsformer", kind="compress", apply="compressor.methods.dsformer"):
    """Args:
    keep_bytes: KEEP ratio in stored bytes (D + S values + S index metadata) of each targeted
        layer, 0 < keep_bytes <= 1; the inner dimension k is solved from it (a multiple of M).
    k: explicit inner dimension for every targeted layer (overrides `keep_bytes`); a multiple of M.
    pattern: "N:M" (N of every M consecutive entries along k in each column of S; default
        "2:4") or "unstructured" (the `density` * k largest entries of each column).
    density: fraction of k kept per column of S with `pattern: unstructured`.
    init: "whitened" (fit ||(W - D S) X|| with calibration statistics) or "plain" (||W - D S||,
        no data).
    coding: how each sparse-coding step picks S's support (N:M patterns; unstructured always
        projects): "sparsegpt" (sweep S's input columns against H, choosing each column's N of
        M atoms as it is reached and folding the removed values into the later columns with
        SparseGPT's OBS update) or "projection" (top-N-of-M of the least-squares S).
    init_iters: alternations of sparse coding (S) and least squares (D).
    cg_iters: conjugate-gradient iterations refining S's values on its support per alternation.
    num_windows: calibration windows for `init: whitened`.
    seq_len: tokens per window (calibration and STF).
    batch_size: windows per forward pass (calibration and STF).
    stf_steps: Straight-Through Factorizer training steps after the initialisation; 0 = none.
    lr: AdamW learning rate of the STF (D and S~ only; everything else is frozen).
    distill: add KL(dense teacher || student) on the logits to the STF loss (keeps a frozen
        copy of the dense model in memory).
    data: STF training text (its `train` split; defaults to the calibration source).
    eval_windows: held-out windows (`eval` split of `data`) on which perplexity is measured
        after the initialisation and after STF; 0 = skip.
    """

    renamed: ClassVar[dict[str, str]] = {
        "rank": "keep_bytes (dsformer's budget counts stored bytes, not parameters)"}

    keep_bytes: float = 0.6
    k: int | None = None
    pattern: str = "2:4"
    density: float = 0.5
    init: Literal["whitened", "plain"] = "whitened"
    coding: Literal["sparsegpt", "projection"] = "sparsegpt"
    init_iters: int = 4
    cg_iters: int = 10
    stf_steps: int = 100
    lr: float = 1e-4
    distill: bool = False
    data: str | None = None
    eval_windows: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            nm = parse_nm(self.pattern)
        except ValueError as err:
            raise ConfigError(f"dsformer: `pattern` {err}") from None
        if not 0 < self.keep_bytes <= 1:
            raise ConfigError(
                f"dsformer: `keep_bytes` is the keep ratio in bytes and must be in (0, 1], got "
                f"{self.keep_bytes!r}; e.g. `keep_bytes: 0.6` keeps 60 % of each layer's bytes"
            )
        if not 0 < self.density <= 1:
            raise ConfigError(
                f"dsformer: `density` must be in (0, 1], got {self.density!r}; e.g. 0.5"
            )
        if self.k is not None:
            _check_explicit_k(self.k, nm, self.density)
        _check_int("init_iters", self.init_iters, 1)
        for key in ("cg_iters", "stf_steps", "eval_windows"):
            _check_int(key, getattr(self, key), 0)
        if not self.lr > 0:
            raise ConfigError(f"dsformer: `lr` must be > 0, got {self.lr!r}; e.g. 1e-4")


def _check_int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"dsformer: `{key}` must be an integer >= {low}, got {value!r}")


def _check_explicit_k(k: int, nm: tuple[int, int] | None, density: float) -> None:
    """An explicit inner dimension must hold whole groups of M (N:M patterns)."""
    _check_int("k", k, 1)
    if nm is not None and k % nm[1]:
        n, m = nm
        lower, upper = k // m * m, (k // m + 1) * m
        raise ConfigError(
            f"dsformer: `k`={k} is not a multiple of M={m} (pattern "
            f"{n}:{m}); use k={upper}" + (f" or k={lower}" if lower else "")
        )

"""The fields every low-rank method shares (svd, asvd, svd-llm, saes-svd, welore): `rank` as a KEEP
ratio of parameters and the rank allocation (uniform, welore, aware), plus the calibration data of
the activation-aware ones. A base: it declares no method (compressor/methods/lowrank.py is the
driver that uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..config import DEFAULT_SECOND_PHASE, CalibrationConfig, MethodConfig
from ..errors import ConfigError

Allocation = Literal["uniform", "welore", "aware"]
AWARE_LOSSES = ("relative", "absolute", "fisher")
AWARE_GROUPS = ("matrix", "block")


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(MethodConfig):
    """Fields shared by every low-rank method.

    Args:
        rank: KEEP ratio of the targeted linears' parameters, 0 < rank ≤ 1 (0.6 = keep 60 %,
            remove 40 %). Each matrix gets r = ⌊rank·m·n/(m+n)⌋; rank 1 keeps every layer dense.
        allocation: `uniform` (the same keep ratio per matrix), `welore` (non-uniform ranks from
            each matrix's normalised singular-value tail, one global threshold bisected to hit
            `rank` in parameters; see compressor/methods/welore.py) or `aware` (svd-llm and
            saes-svd only: non-uniform ranks from the whitened spectra, the calibration output
            error each rank costs, spent greedily under the same parameter budget; see
            compressor/methods/_lowrank_allocation.py).
        min_ratio: with `welore` allocation, a matrix is factored only when more than this
            fraction of its rank is removed (WeLore's LRC/N-LRC split); others stay dense.
        floor_ratio: with `aware` allocation, every factored matrix keeps at least this fraction
            of its full rank min(m, n).
        rank_spread: with `aware` allocation and a value s > 1, every matrix's rank stays within
            [u/s, u·s] of its uniform rank u (0 = no limit besides `floor_ratio` and break-even);
            with `aware_group: block` it bounds the block multipliers the same way.
        aware_loss: with `aware` allocation, how losses are compared across matrices: `fisher`
            (default: the output error weighted by the loss gradient's energy at that output, its
            end-to-end effect under an isotropic Fisher; one backward pass per window over 16
            calibration windows), `relative` (the fraction of each matrix's whitened output
            energy dropped) or `absolute` (the output error itself, which favours the layers with
            the largest activations).
        aware_group: with `aware` allocation, what gets its own rank: `block` (default: one rank
            multiplier c per transformer block, c ∈ [1/s, s] for s = `rank_spread` in steps of
            0.05; inside a block every matrix keeps its uniform rank times c, so the budget moves
            along depth only) or `matrix` (every matrix its own rank, `rank_spread` bounding each).
            The defaults (fisher, block, spread 2) were measured best on SmolLM2-135M:
            reports/p2_allocation.md; the rule is in compressor/methods/_lowrank_allocation.py.
    """

    rank: float = 0.5
    allocation: Allocation = "uniform"
    min_ratio: float = 0.4999
    floor_ratio: float = 0.05
    rank_spread: float = 2.0
    aware_loss: str = "fisher"
    aware_group: str = "block"
    # Methods whose factorisation is whitened SVD set this: `allocation: aware` prices ranks by it.
    supports_aware_allocation: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.method_name or "low-rank"
        if (
            not isinstance(self.rank, (int, float))
            or isinstance(self.rank, bool)
            or not 0 < self.rank <= 1
        ):
            raise ConfigError(
                f"{name}: `rank` is the keep ratio of parameters and must be in (0, 1], got {self.rank!r}; "
                "e.g. `rank: 0.6` keeps 60 % (removes 40 %)"
            )
        if self.allocation not in ("uniform", "welore", "aware"):
            raise ConfigError(
                f"{name}: `allocation` must be `uniform`, `welore` or `aware`, got {self.allocation!r}"
            )
        if self.allocation == "aware" and not self.supports_aware_allocation:
            raise ConfigError(
                f"{name}: `allocation: aware` prices ranks by whitened spectra and needs svd-llm or "
                "saes-svd; use `allocation: welore` or `uniform` here"
            )
        if self.aware_loss not in AWARE_LOSSES:
            raise ConfigError(
                f"{name}: `aware_loss` must be `relative`, `absolute` or `fisher`, got {self.aware_loss!r}"
            )
        if self.aware_group not in AWARE_GROUPS:
            raise ConfigError(
                f"{name}: `aware_group` must be `matrix` or `block`, got {self.aware_group!r}"
            )
        if not 0 <= self.floor_ratio < 1:
            raise ConfigError(f"{name}: `floor_ratio` must be in [0, 1), got {self.floor_ratio!r}")
        if not (self.rank_spread == 0 or self.rank_spread > 1):
            raise ConfigError(
                f"{name}: `rank_spread` must be 0 (no limit) or > 1, got {self.rank_spread!r}"
            )
        if not 0 <= self.min_ratio < 1:
            raise ConfigError(
                f"{name}: `min_ratio` must be in [0, 1), got {self.min_ratio!r}; WeLore uses 0.4999"
            )


@dataclass(frozen=True, kw_only=True)
class CalibratedLowRankConfig(CalibrationConfig, LowRankConfig, num_windows=128):
    """Low-rank fields plus the calibration data of the activation-aware methods.

    Args:
        num_windows: calibration windows (≥ 64 recommended: 8 windows gave perplexity 4629 in
            SVD-LLM issue #54; fewer than 64 warns).
        second_phase: linears (same syntax as `targets`) compressed after the rest of their block,
            because their inputs come from the block's other linears (attention output, MLP down).
    """

    second_phase: tuple[str, ...] = DEFAULT_SECOND_PHASE

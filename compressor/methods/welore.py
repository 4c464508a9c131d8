"""WeLore: non-uniform ranks from each matrix's normalised singular-value tail.

Paper: Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from
Low-Rank Gradients", https://arxiv.org/abs/2407.11239 (reference code: utils.py
adaptive_rank_pruning, do_rank_reduction). METHODS.md §2.

Each matrix's spectrum is min-max normalised, σ̂ = (σ − min σ)/(max σ − min σ) ∈ [0, 1], and ONE
global threshold τ removes p = #{i : σ̂_i < τ} ranks from every matrix: heavy-tailed matrices lose
many ranks, flat ones few. A matrix is a low-rank component (LRC) — factored — only when more than
`min_ratio` of its rank is removed (and factoring saves parameters); the others (N-LRC) stay dense.
The paper tunes τ per model by hand to hit a rank reduction; here τ is bisected so the PARAMETERS
kept hit `rank` (the keep ratio, as everywhere in compressor). Parameters only fall as τ grows (an
LRC switch happens below the break-even rank), so the search is a bisection over the sorted σ̂
values and lands on the smallest τ within budget; the realised keep ratio is ≤ the request by at
most one matrix's step.

`welore` as a stage factors the LRCs by plain truncated SVD (U√Σ, √ΣVᵀ, as the paper); any other
low-rank method uses the same allocation with `allocation: welore`.
"""

from __future__ import annotations

from collections.abc import Mapping

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..analysis.spectra import is_low_rank_component, singular_values, welore_normalise
from ..context import Context
from ..errors import ConfigError
from ..registry import register
from ..report.records import StageResult
from .lowrank import NO_SAVING, LayerPlan, LayerStats, LowRankConfig, compress_model, factoring_saves
from .svd import svd_factors


@dataclass(frozen=True, kw_only=True)
class WeLoreConfig(LowRankConfig):
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


def layer_plan_at(
    name: str, shape: tuple[int, int], normalised: Tensor, tau: float, min_ratio: float
) -> LayerPlan:
    """One matrix at threshold τ: factored at min(m, n) − p if it is an LRC that saves parameters."""
    m, n = shape
    full = min(m, n)
    removed = int((normalised < tau).sum())
    rank = max(full - removed, 1)
    if is_low_rank_component(removed, full, min_ratio) and factoring_saves(m, n, rank):
        return LayerPlan(name, m, n, rank)
    reason = (
        "N-LRC (too little rank removed): dense"
        if removed / full <= min_ratio
        else f"rank {rank} {NO_SAVING} on {m}x{n}: dense"
    )
    return LayerPlan(name, m, n, None, reason)


def welore_allocation(
    spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], keep: float, min_ratio: float
) -> tuple[dict[str, LayerPlan], float]:
    """({name: σ (k,) descending}, {name: (m, n)}, keep, min_ratio) -> (plans, τ).

    The smallest τ whose kept parameters are ≤ keep · Σ m·n (τ = 0 keeps everything dense)."""
    normalised = {name: welore_normalise(s.double()) for name, s in spectra.items()}
    budget = keep * sum(m * n for m, n in shapes.values())
    values = torch.cat(list(normalised.values())).unique()  # sorted ascending
    # p(τ) only changes when τ crosses a σ̂ value: test 0, the midpoints and just above the top.
    taus = [0.0, *((values[:-1] + values[1:]) / 2).tolist(), values[-1].item() + 1e-6]

    def plans_at(tau: float) -> dict[str, LayerPlan]:
        return {n: layer_plan_at(n, shapes[n], normalised[n], tau, min_ratio) for n in shapes}

    def kept(tau: float) -> int:
        return sum(p.params_kept for p in plans_at(tau).values())

    low, high = 0, len(taus) - 1  # invariant: kept(taus[high]) ≤ budget unless nothing fits
    if kept(taus[0]) <= budget:
        high = 0
    while high - low > 1:
        mid = (low + high) // 2
        if kept(taus[mid]) <= budget:
            high = mid
        else:
            low = mid
    return plans_at(taus[high]), taus[high]


def welore_plan(
    weights: Mapping[str, Tensor], keep: float, min_ratio: float
) -> tuple[dict[str, LayerPlan], float]:
    """WeLore allocation from the weights themselves: {name: W (m, n)} -> (plans, τ)."""
    spectra, shapes = {}, {}
    for name, w in weights.items():  # one pass: `weights` may read each matrix from offload
        spectra[name], shapes[name] = singular_values(w), (w.shape[0], w.shape[1])
    return welore_allocation(spectra, shapes, keep, min_ratio)


def _factorize(
    name: str, weight: Tensor, stats: LayerStats | None, rank: int, config: WeLoreConfig
):
    return (*svd_factors(weight, rank), {})


@register("welore", WeLoreConfig, kind="compress")
def apply(model: nn.Module, config: WeLoreConfig, ctx: Context) -> StageResult:
    """Factor WeLore's low-rank components (truncated SVD at their tail-derived ranks); N-LRCs stay dense."""
    result = compress_model(model, config, ctx, _factorize, stats_kind=None)
    result.metrics["lrc_layers"] = sum(1 for row in result.per_module if row["factored"])
    return result

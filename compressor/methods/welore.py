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

The allocation is in _lowrank_plan.py (the low-rank driver applies it for `allocation: welore`).
`welore` as a stage factors the LRCs by plain truncated SVD (U√Σ, √ΣVᵀ, as the paper); any other
low-rank method uses the same allocation with `allocation: welore`.
"""

from __future__ import annotations

from torch import nn

from ..configs.welore import WeLoreConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ._lowrank_driver import LowRankDriver, TruncatedSVD
from ._lowrank_plan import layer_plan_at, welore_allocation, welore_plan  # noqa: F401  (the allocation; re-exported)


@register(WeLoreConfig)
def apply(model: nn.Module, config: WeLoreConfig, ctx: Context) -> StageResult:
    """Factor WeLore's low-rank components (truncated SVD at their tail-derived ranks); N-LRCs stay dense."""
    result = LowRankDriver(model, config, ctx, TruncatedSVD()).run()
    result.metrics["lrc_layers"] = sum(1 for row in result.per_module if row["factored"])
    return result

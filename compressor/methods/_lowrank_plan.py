"""Rank planning of the low-rank family (pure): which rank each targeted linear keeps.

`uniform` gives every (m, n) matrix r = ⌊keep·m·n/(m+n)⌋; `welore` (Jaiswal et al., arXiv
2407.11239; see welore.py) one global threshold τ on the min-max normalised spectra, bisected so
the kept parameters hit `keep`. Both sit below the driver (_lowrank_driver.py) that applies them and the
methods built on it; the calibration-aware allocation is _lowrank_allocation.py.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..analysis.spectra import is_low_rank_component, singular_values, welore_normalise

NO_SAVING = "would not save parameters"  # the wording of a no-saving layer's `reason`


class LayerStatus(enum.Enum):
    """What happens to one targeted linear; the report counts and explains dense layers by it."""

    FACTORED = "factored"
    KEPT_DENSE_KEEP_ONE = "kept dense: keep ratio 1"
    KEPT_DENSE_NO_SAVING = "kept dense: factoring would not save parameters"
    KEPT_DENSE_N_LRC = "kept dense: WeLore N-LRC (too little rank removed)"
    SKIPPED_OUTSIDE_BLOCKS = "kept dense: outside the transformer blocks (no calibration inputs)"


def uniform_rank(out_features: int, in_features: int, keep: float) -> int:
    """r = ⌊keep·m·n/(m+n)⌋: the rank whose factors hold `keep` of the dense parameters."""
    # The epsilon stops 0.6·m·n/(m+n) = 19.999999 from flooring to 19 through float rounding.
    return math.floor(keep * out_features * in_features / (out_features + in_features) + 1e-9)


def factoring_saves(out_features: int, in_features: int, r: int) -> bool:
    """True when rank-`r` factors are strictly smaller than the dense matrix."""
    return 0 < r < min(out_features, in_features) and r * (out_features + in_features) < out_features * in_features


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one targeted (m, n) linear: factored at the integer rank `r` (U (m, r),
    V (r, n)), or kept dense (`status` says why, `reason` in words; `r` is then its full rank
    min(m, n), as the report lists it)."""

    name: str
    out_features: int
    in_features: int
    r: int
    status: LayerStatus = LayerStatus.FACTORED
    reason: str = ""

    @property
    def factored(self) -> bool:
        return self.status is LayerStatus.FACTORED

    @property
    def params_dense(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_kept(self) -> int:
        if not self.factored:
            return self.params_dense
        return self.r * (self.out_features + self.in_features)

    def kept_dense(self, status: LayerStatus, reason: str) -> LayerPlan:
        """This plan revised: the layer stays dense for `status` (`reason` in words)."""
        return replace(self, r=min(self.out_features, self.in_features), status=status, reason=reason)


def dense_plan(name: str, out_features: int, in_features: int, status: LayerStatus, reason: str) -> LayerPlan:
    """A layer that stays dense (its full rank min(m, n) kept)."""
    return LayerPlan(name, out_features, in_features, min(out_features, in_features), status, reason)


def no_saving_reason(r: int, out_features: int, in_features: int) -> str:
    return f"rank {r} {NO_SAVING} on {out_features}x{in_features}: dense"


def plan_layer(name: str, out_features: int, in_features: int, r: int, keep: float) -> LayerPlan:
    """Factor at rank `r` unless keep = 1 or factoring would not save parameters."""
    if keep >= 1:
        return dense_plan(name, out_features, in_features, LayerStatus.KEPT_DENSE_KEEP_ONE, "keep ratio 1: dense")
    r = max(r, 1)
    if not factoring_saves(out_features, in_features, r):
        return dense_plan(name, out_features, in_features, LayerStatus.KEPT_DENSE_NO_SAVING,
                          no_saving_reason(r, out_features, in_features))
    return LayerPlan(name, out_features, in_features, r)


def plan_uniform(shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, LayerPlan]:
    """Uniform allocation: every (m, n) matrix keeps ⌊keep·m·n/(m+n)⌋ ranks."""
    return {
        name: plan_layer(name, m, n, uniform_rank(m, n, keep), keep)
        for name, (m, n) in shapes.items()
    }


def keep_ratio_reached(plans: dict[str, LayerPlan]) -> tuple[int, int, float]:
    """(params_dense, params_kept, kept/dense) over the planned linears (weights only, no biases)."""
    dense = sum(p.params_dense for p in plans.values())
    kept = sum(p.params_kept for p in plans.values())
    return dense, kept, kept / dense if dense else 1.0


# ---------------------------------------------------------------- WeLore allocation


def layer_plan_at(
    name: str, shape: tuple[int, int], normalised: Tensor, tau: float, min_ratio: float
) -> LayerPlan:
    """One matrix at threshold τ: factored at min(m, n) − p if it is an LRC that saves parameters."""
    m, n = shape
    full = min(m, n)
    removed = int((normalised < tau).sum())
    r = max(full - removed, 1)
    if is_low_rank_component(removed, full, min_ratio) and factoring_saves(m, n, r):
        return LayerPlan(name, m, n, r)
    if removed / full <= min_ratio:
        return dense_plan(name, m, n, LayerStatus.KEPT_DENSE_N_LRC, "N-LRC (too little rank removed): dense")
    return dense_plan(name, m, n, LayerStatus.KEPT_DENSE_NO_SAVING, no_saving_reason(r, m, n))


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

"""The low-rank driver: plan → factorize → install for the whole family (svd, asvd, svd-llm,
saes-svd, welore). Registers no method.

A method supplies only its `Factorization`: the LayerStats kind it reads (`stats_kind`, None =
data-free) and `factorize(name, W, stats, r) -> Factors`. `LowRankDriver(model, config, ctx,
factorization).run()` does the rest, in one place:

1. plan: select the targeted linears and give each a frozen `LayerPlan` (uniform, WeLore or aware
   allocation, compressor/methods/_lowrank_plan.py and _lowrank_allocation.py): the integer rank
   `r`, or dense with a `LayerStatus` saying why. `config.rank` is only the keep ratio.
2. factorize + install: the data-free loop (`compress_each`) or the sequential calibration engine
   (`compress_blocks`) calls `_install` per layer, which factors W at its planned `r`, refuses
   non-finite factors and puts a LowRankLinear in its place.
3. report: per-module rows, metrics and notes read from the plans' statuses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..calibration import (
    CalibrationHooks,
    LayerStats,
    calibration_windows,
    compress_blocks,
    compress_each,
)
from ..calibration.engine import outside_blocks
from ..context import Context
from ..errors import ConfigError
from ..layers import CompressedLinear, LowRankLinear
from ..memory import PeakMemory
from ..offload import MaterializedWeights
from ..report.records import StageResult
from ..targeting import layer_type, linear_shape, linear_weight, select_linears
from ._factors import check_finite, svd_factors
from ._lowrank_allocation import aware_plan
from ._lowrank_plan import LayerPlan, LayerStatus, keep_ratio_reached, plan_uniform, welore_plan
from .lowrank import CalibratedLowRankConfig, LowRankConfig

OUTSIDE_BLOCKS = "outside the transformer blocks (no calibration inputs): dense"


@dataclass(frozen=True)
class Factors:
    """One factorization: W ≈ left @ right with left (m, r), right (r, n); `info` = extra
    per-module report fields (numbers), `notes` = report notes about this layer."""

    left: Tensor
    right: Tensor
    info: Mapping[str, float | int | bool] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


class Factorization(Protocol):
    """What one low-rank method supplies to the driver."""

    @property
    def stats_kind(self) -> str | None:
        """The LayerStats kind `factorize` reads (`abs_mean`, `hessian`, `hessian+cross`), None = no data."""
        ...

    def factorize(self, name: str, weight: Tensor, stats: LayerStats | None, r: int) -> Factors:
        """W (m, n) on the calibration device, its input statistics, the integer rank r -> Factors."""
        ...


@dataclass(frozen=True)
class TruncatedSVD:
    """Plain truncated SVD of W itself (svd, welore): no statistics."""

    stats_kind: str | None = None

    def factorize(self, name: str, weight: Tensor, stats: LayerStats | None, r: int) -> Factors:
        return Factors(*svd_factors(weight, r))


class LowRankDriver:
    """One run of a low-rank method on `model`: plan → factorize → install → report."""

    def __init__(self, model: nn.Module, config: LowRankConfig, ctx: Context, factorization: Factorization):
        self.model, self.config, self.ctx, self.factorization = model, config, ctx, factorization
        self.plans: dict[str, LayerPlan] = {}
        self.installed: dict[str, Factors] = {}
        self.notes: list[str] = []

    def run(self) -> StageResult:
        """Factor every targeted linear at its planned rank (sequentially calibrated when the
        factorization reads statistics) and return the stage's report."""
        started = time.perf_counter()
        with PeakMemory(self.ctx.device) as memory:
            self.plans, self.notes = plan_ranks(self.model, self.config, self.ctx)
            training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    calibration = self._factor_all()
            finally:
                self.model.train(training)
        return self._result(calibration, time.perf_counter() - started, memory.peak_mb)

    def _to_factor(self) -> dict[str, nn.Module]:
        return {name: self.model.get_submodule(name) for name, plan in self.plans.items() if plan.factored}

    def _factor_all(self) -> dict[str, float]:
        """The data-free loop, or the engine's block loop; returns the calibration metrics."""
        hooks = CalibrationHooks(self.factorization.stats_kind, self._install)
        if hooks.stats is None:
            compress_each(self.model, self._to_factor(), hooks, self.ctx, f"{self.config.method_name}")
            return {}
        config = self.config
        assert isinstance(config, CalibratedLowRankConfig), "a factorization that reads statistics needs calibration fields"
        windows, notes = calibration_windows(config, self.ctx)
        self.notes.extend(notes)
        for name in outside_blocks(self.model, list(self._to_factor())):
            self.plans[name] = self.plans[name].kept_dense(LayerStatus.SKIPPED_OUTSIDE_BLOCKS, OUTSIDE_BLOCKS)
            self.notes.append(f"{name} is outside the transformer blocks and was kept dense; add it to `ignore`")
        summary = compress_blocks(
            self.model, self._to_factor(), hooks, windows, self.ctx, batch_size=config.batch_size,
            second_phase=config.second_phase, description=f"{config.method_name}: blocks",
        )
        return summary.metrics

    def _install(self, name: str, module: nn.Module, stats: LayerStats | None) -> LowRankLinear:
        """The engine's per-layer step: `name` factored at its planned r into a LowRankLinear
        (weights keep their dtype; the engine places it where `module` lived)."""
        weight = linear_weight(module).detach()
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        if stats is not None:
            stats = stats.to(self.ctx.device)
        factors = self.factorization.factorize(name, weight.to(self.ctx.device), stats, self.plans[name].r)
        check_finite(name, factors.left, factors.right)
        self.notes.extend(factors.notes)
        self.installed[name] = factors
        return LowRankLinear.from_factors(factors.left.to(weight), factors.right.to(weight), bias)

    def _row(self, plan: LayerPlan) -> dict:
        """One per-module report row (`rank` there is the integer r; a dense layer's is min(m, n))."""
        row = {
            "module": plan.name,
            "type": layer_type(plan.name),
            "shape": f"{plan.out_features}x{plan.in_features}",
            "factored": plan.factored,
            "rank": plan.r,
            "params_dense": plan.params_dense,
            "params_kept": plan.params_kept,
            "status": plan.reason if not plan.factored else "factored" if plan.name in self.installed else "planned",
        }
        factors = self.installed.get(plan.name)
        if factors is not None:
            row.update({key: _scalar(value) for key, value in factors.info.items()})
        return row

    def _result(self, calibration: dict[str, float], seconds: float, peak_mb: float) -> StageResult:
        plans = self.plans
        dense, kept, reached = keep_ratio_reached(plans)
        factored = sum(1 for p in plans.values() if p.factored)
        notes = [*self.notes, *dense_notes(plans)]
        metrics = {
            "params_dense": dense,
            "params_kept": kept,
            "keep_ratio_requested": self.config.rank,
            "keep_ratio_reached": reached,
            "layers_factored": factored,
            "layers_dense": len(plans) - factored,
            "seconds": seconds,
            "peak_memory_mb": peak_mb,
            **calibration,
        }
        return StageResult(metrics=metrics, per_module=[self._row(p) for p in plans.values()], notes=notes)


def plan_ranks(model: nn.Module, config: LowRankConfig, ctx: Context) -> tuple[dict[str, LayerPlan], list[str]]:
    """Select the targeted linears and plan each one (uniform, WeLore or aware allocation);
    returns the plans and the report notes about them."""
    selected = select_linears(model, config.targets, config.ignore)
    notes = []
    already = [n for n, m in selected.items() if isinstance(m, CompressedLinear)]
    if already:
        notes.append(f"{len(already)} targeted layers are already compressed and were skipped: {already[:4]}")
    shapes = {n: tuple(linear_shape(m)) for n, m in selected.items() if n not in already}
    if not shapes:
        raise ConfigError(f"{config.method_name}: every targeted linear is already compressed; nothing to do")
    if config.allocation == "welore":
        plans, tau = welore_plan(MaterializedWeights({n: selected[n] for n in shapes}), config.rank, config.min_ratio)
        notes.append(f"WeLore allocation: global tau {tau:.4f}")
    elif config.allocation == "aware":
        assert isinstance(config, CalibratedLowRankConfig)  # LowRankConfig refuses `aware` for the others
        plans, aware_notes = aware_plan(model, {n: selected[n] for n in shapes}, shapes, config, ctx)
        notes.extend(aware_notes)
    else:
        plans = plan_uniform(shapes, config.rank)
    return plans, notes


def dense_notes(plans: Mapping[str, LayerPlan]) -> list[str]:
    """The report's notes about the layers kept dense, counted by their status."""
    notes = []
    larger = [p.name for p in plans.values() if p.status is LayerStatus.KEPT_DENSE_NO_SAVING]
    if larger:
        notes.append(
            f"{len(larger)} layer(s) kept dense because factoring them at their rank would hold at least "
            f"as many parameters as the dense weight (r·(m+n) ≥ m·n): {', '.join(larger[:6])}"
            + (" ..." if len(larger) > 6 else "")
        )
    dense = sum(1 for p in plans.values() if not p.factored)
    if dense:
        notes.append(
            f"{dense} of {len(plans)} targeted layers kept dense; "
            "per-module `status` says why (no parameter saving, keep 1, WeLore N-LRC, ...)"
        )
    return notes


def _scalar(value):
    if isinstance(value, Tensor):
        return value.item()
    return value

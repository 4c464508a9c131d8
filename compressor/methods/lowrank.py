"""Shared machinery of the training-free low-rank family (svd, asvd, svd-llm, saes-svd, welore).

`rank` is always a KEEP ratio of parameters (METHODS §13.1: every SVD codebase mixes keep and
remove up): a targeted (m, n) linear gets r = ⌊rank·m·n/(m+n)⌋ so its factors U (m, r) and
V (r, n) hold about `rank`·m·n numbers. A layer stays dense when factoring it would not save
parameters (r ≥ min(m, n) or r·(m+n) ≥ m·n) and whenever `rank` = 1, so rank 1 is the identity.

Calibrated methods run sequentially, one transformer block at a time (compressor.calibration):
capture the block's inputs, hook the block's targeted linears to accumulate statistics, compress,
then feed the COMPRESSED block's outputs to the next block, so every layer sees the error its
upstream compression introduced. Inside a block the linears are compressed in two phases — the
ones reading the block input (q, k, v, gate, up) first, then the ones in `second_phase` (o, down)
— so the second phase is calibrated on the compressed first phase's outputs. Methods that need the
full-precision "teacher" inputs X_f as well (saes-svd, the svd-llm update) stream a copy of the
original block in parallel. Peak memory is one block's inputs (student and teacher), one batch of
hooked activations and the statistics of one block's linears; weights may stay on the CPU while
each block is moved to `ctx.device` for its calibration passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..calibration import (  # noqa: F401  (LayerStats, split_phases re-exported for the method modules and tests)
    CalibrationHooks,
    LayerStats,
    calibration_windows,
    compress_blocks,
    compress_each,
    outside_blocks,
    split_phases,
)
from ..configs.lowrank import (  # noqa: F401  (the config, declared there; re-exported)
    AWARE_GROUPS,
    AWARE_LOSSES,
    Allocation,
    CalibratedLowRankConfig,
    LowRankConfig,
)
from ..context import Context
from ..errors import ConfigError, ModelError
from ..layers import CompressedLinear, LowRankLinear
from ..memory import PeakMemory
from ..offload import MaterializedWeights
from ..report.records import StageResult
from ..targeting import layer_type, linear_shape, linear_weight, select_linears
from ._lowrank_plan import (  # noqa: F401  (re-exported for the method modules and tests)
    NO_SAVING,
    LayerPlan,
    factoring_saves,
    keep_ratio_reached,
    plan_layer,
    plan_uniform,
    uniform_rank,
    welore_plan,
)

# ---------------------------------------------------------------- factor helpers (pure)


def split_singular(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Fuse √Σ into both factors: (u (m, k), s (k,), vh (k, n)) -> (U_r√Σ_r (m, r), √Σ_r V_rᵀ (r, n))."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def check_finite(name: str, *tensors: Tensor) -> None:
    """Refuse to install NaN/inf factors: a silent NaN would poison every later block."""
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ModelError(
                f"non-finite low-rank factors for `{name}` (calibration statistics are degenerate); "
                "use more calibration windows, or add the layer to `ignore`"
            )


# ---------------------------------------------------------------- the compression driver

Factorize = Callable[
    [str, Tensor, "LayerStats | None", int, LowRankConfig], tuple[Tensor, Tensor, dict]
]


@dataclass
class _Run:
    """Mutable state of one compression run: the plan, the per-module rows and the notes."""

    model: nn.Module
    config: LowRankConfig
    ctx: Context
    factorize: Factorize
    plans: dict[str, LayerPlan]
    rows: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def compress(self, name: str, module: nn.Module, stats: LayerStats | None) -> LowRankLinear:
        """The engine's per-layer step: factor `name` at its planned rank into a LowRankLinear
        (weights keep their dtype)."""
        plan = self.plans[name]
        weight = linear_weight(module).detach()
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        if stats is not None:
            stats = stats.to(self.ctx.device)
        left, right, info = self.factorize(
            name, weight.to(self.ctx.device), stats, plan.rank, self.config
        )
        check_finite(name, left, right)
        layer = LowRankLinear.from_factors(left.to(weight), right.to(weight), bias)
        self.notes.extend(info.pop("notes", []))
        self.rows[name].update({k: _scalar(v) for k, v in info.items()})
        self.rows[name]["status"] = "factored"
        return layer

    def factored(self) -> dict[str, nn.Module]:
        """{name: module} of the linears planned to be factored."""
        return {n: self.model.get_submodule(n) for n, p in self.plans.items() if p.rank}

    def keep_dense(self, name: str, reason: str, note: str) -> None:
        """Revise the plan: `name` stays dense (e.g. it gets no calibration inputs)."""
        plan = self.plans[name]
        plan.rank, plan.reason = None, reason
        self.rows[name] = _row(plan)
        self.notes.append(note)


def compress_model(
    model: nn.Module,
    config: LowRankConfig,
    ctx: Context,
    factorize: Factorize,
    *,
    stats_kind: str | None,
) -> StageResult:
    """Plan ranks, factor every targeted linear (sequentially calibrated when `stats_kind` is set:
    `abs_mean`, `hessian` or `hessian+cross` = also the teacher's inputs) and report."""
    started = time.perf_counter()
    with PeakMemory(ctx.device) as memory:
        plans, notes = plan_ranks(model, config, ctx)
        run = _Run(model, config, ctx, factorize, plans, notes=notes)
        run.rows = {name: _row(plan) for name, plan in plans.items()}
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if stats_kind is None:
                    compress_each(model, run.factored(), CalibrationHooks(None, run.compress), ctx,
                                  f"{config.method_name}")
                else:
                    _compress_calibrated(run, stats_kind)
        finally:
            model.train(training)
    return _result(run, time.perf_counter() - started, memory.peak_mb)


def _compress_calibrated(run: _Run, stats_kind: str) -> None:
    """The engine's block loop over the factored linears (those outside every block stay dense)."""
    config = run.config
    windows = calibration_windows(config, run.ctx, run.notes)
    for name in outside_blocks(run.model, list(run.factored())):
        run.keep_dense(
            name,
            "outside the transformer blocks (no calibration inputs): dense",
            f"{name} is outside the transformer blocks and was kept dense; add it to `ignore`",
        )
    summary = compress_blocks(
        run.model, run.factored(), CalibrationHooks(stats_kind, run.compress), windows, run.ctx,
        batch_size=config.batch_size, second_phase=config.second_phase,
        description=f"{config.method_name}: blocks",
    )
    run.metrics.update(summary.metrics)


def plan_ranks(
    model: nn.Module, config: LowRankConfig, ctx: Context
) -> tuple[dict[str, LayerPlan], list[str]]:
    """Select the targeted linears and decide each one's rank (uniform or WeLore allocation)."""
    selected = select_linears(model, config.targets, config.ignore)
    notes = []
    already = [n for n, m in selected.items() if isinstance(m, CompressedLinear)]
    if already:
        notes.append(
            f"{len(already)} targeted layers are already compressed and were skipped: {already[:4]}"
        )
    shapes = {n: tuple(linear_shape(m)) for n, m in selected.items() if n not in already}
    if not shapes:
        raise ConfigError(
            f"{config.method_name}: every targeted linear is already compressed; nothing to do"
        )
    if config.allocation == "welore":
        plans, tau = welore_plan(
            MaterializedWeights({n: selected[n] for n in shapes}), config.rank, config.min_ratio
        )
        notes.append(f"WeLore allocation: global tau {tau:.4f}")
    elif config.allocation == "aware":
        from ._lowrank_allocation import aware_plan  # needs the calibration plumbing: import lazily

        plans = aware_plan(model, {n: selected[n] for n in shapes}, shapes, config, ctx, notes)
    else:
        plans = plan_uniform(shapes, config.rank)
    return plans, notes


def _row(plan: LayerPlan) -> dict:
    """One per-module report row; a dense layer reports its full rank min(m, n)."""
    return {
        "module": plan.name,
        "type": layer_type(plan.name),
        "shape": f"{plan.out_features}x{plan.in_features}",
        "factored": plan.rank is not None,
        "rank": plan.rank if plan.rank is not None else min(plan.out_features, plan.in_features),
        "params_dense": plan.params_dense,
        "params_kept": plan.params_kept,
        "status": "planned" if plan.rank else plan.reason,
    }


def _scalar(value):
    if isinstance(value, Tensor):
        return value.item()
    return value


def _result(run: _Run, seconds: float, peak_mb: float) -> StageResult:
    dense, kept, reached = keep_ratio_reached(run.plans)
    factored = sum(1 for p in run.plans.values() if p.rank)
    larger = [p.name for p in run.plans.values() if p.rank is None and NO_SAVING in p.reason]
    if larger:
        run.notes.append(
            f"{len(larger)} layer(s) kept dense because factoring them at their rank would hold at least "
            f"as many parameters as the dense weight (r·(m+n) ≥ m·n): {', '.join(larger[:6])}"
            + (" ..." if len(larger) > 6 else "")
        )
    if len(run.plans) > factored:
        run.notes.append(
            f"{len(run.plans) - factored} of {len(run.plans)} targeted layers kept dense; "
            "per-module `status` says why (no parameter saving, keep 1, WeLore N-LRC, ...)"
        )
    metrics = {
        "params_dense": dense,
        "params_kept": kept,
        "keep_ratio_requested": run.config.rank,
        "keep_ratio_reached": reached,
        "layers_factored": factored,
        "layers_dense": len(run.plans) - factored,
        "seconds": seconds,
        "peak_memory_mb": peak_mb,
        **run.metrics,
    }
    return StageResult(metrics=metrics, per_module=list(run.rows.values()), notes=run.notes)

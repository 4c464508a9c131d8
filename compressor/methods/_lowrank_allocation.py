"""Activation-aware non-uniform ranks (`allocation: aware`, svd-llm and saes-svd).

For whitened SVD the calibration output error of keeping r ranks of W is exactly
‖(W − W')X‖²/N = Σ_{i>r} σ_i² with σ the singular values of W·L (H = X Xᵀ/N = L Lᵀ), so each
matrix's spectrum prices every rank. The allocation spends ONE global parameter budget
(see 4) where it removes the most loss per parameter:

1. First pass, before anything is compressed: the dense model's block inputs are streamed block
   by block (memory: one block's inputs and statistics) and the whitened spectrum of every targeted
   linear is computed. The sequential compression that follows calibrates block b on the
   compressed outputs of blocks < b, so the statistics of later blocks do not exist yet when an
   allocation is needed; the dense model's are the consistent stand-in.
2. `allocate_ranks`: every matrix starts at its floor rank; rank steps (and the final step to
   dense) are bought greedily by loss removed per parameter on each matrix's lower convex hull of
   (parameters, loss) options; a hull step that no longer fits falls back to single ranks, so the
   budget is hit within one rank step.
3. A factored matrix never holds more parameters than its dense weight: the largest factored rank
   is the largest r with r·(m+n) < m·n; beyond it the only option is dense (loss 0).
4. The budget is the parameters the uniform plan keeps (so aware ranks are compared with uniform
   ones at equal size), and with `rank_spread: s` each rank stays within [u/s, s·u] of its
   uniform rank u (`aware_group: matrix`).

Defaults: `aware_loss: fisher`, `aware_group: block`, `rank_spread: 2` (measured best on
SmolLM2-135M, reports/p2_allocation.md). `relative` losses are normalised per matrix: Σ_{i>r} σ_i² / Σ σ_i²,
the fraction of that layer's calibration output energy the truncation drops. The raw error
(`absolute`) compares layers by activation scale, which grows along the residual stream; `fisher`
weights the raw error by the mean squared gradient of the loss at the layer's output (an
isotropic-Fisher estimate of its end-to-end effect, one backward pass per window over 16
calibration windows, so it needs the whole model's activations for one window).

Grouping (`aware_group`). `matrix` prices every matrix's own rank as above. `block` moves the
budget along depth only: one multiplier c per transformer block, c ∈ [1/s, s] (s = `rank_spread`)
in steps of 0.05, every matrix of the block at its uniform rank times c (`block_ranks`); the
block's loss at c is the sum of its matrices' losses, bought greedily per parameter as above.
Why: SAES-SVD (and sequential whitening) calibrate o_proj / down_proj on the outputs of the
block's already-factored q/k/v and gate/up, so inside a block errors are partly compensated
and the per-matrix losses mislead; between blocks, `fisher` weights (how much the next-token loss
reacts to each block's output) say where rank is worth most.

Measured (stories260K, saes-svd, 128×256 calibration tokens, 43,520 held-out tokens, at most
the parameters of uniform; perplexity at keep 0.6 / 0.4): uniform 44.55 / 91.06.
Per matrix: relative spread 1.5 43.41 / 91.50; fisher 47.09 / 90.75; absolute 57.06 / 92.22;
relative spread 2 60.58 / 100.63; relative unbounded 65.92 / 111.85 (13 / 7 matrices dense); a
per-token diagonal Fisher in the whitened singular basis (not built) 47.44 / 87.01 at spread
1.5, 45.47 / 90.71 at 1.25. Per block (c ∈ [0.7, 1.3] unless said): fisher 46.77 / 77.49;
fisher with the diagonal Fisher 46.90 / 78.86; relative 46.42 / 84.01; fisher, spread 1.3 (the
built rule, c ∈ [0.8, 1.3]) 47.88 / 81.85. Unbounded per-matrix allocations lower the summed
whitened loss (the property the tests check) but raise perplexity: per-layer errors do not add
up independently through the network.

Measured (SmolLM2-135M, saes-svd, 32×256 calibration tokens of wikitext-2's first half, 16×512
held-out tokens of its second half; keep 0.6 / 0.4): uniform 127.87 / 203.51; relative per
matrix, spread 1.5 124.00 / 207.07; fisher per block, spread 1.3 115.23 / 191.32; spread 1.6
111.87 / 188.29; spread 2 111.66 / 175.01 (−12.7 % / −14.0 %; reports/p2_allocation.md). The
spread was picked among these three by held-out perplexity (there is no third split). With 30 blocks the multipliers favour the first
blocks (at the upper bound) over the middle ones (at the lower bound).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..calibration import LayerStats, PhaseStep, calibrated_phases, calibration_windows
from ..context import Context
from ..errors import ConfigError
from ..numerics import cholesky_with_shift
from ..offload import materialized
from ..targeting import linear_shape, linear_weight
from ._lowrank_plan import (
    LayerPlan,
    LayerStatus,
    dense_plan,
    factoring_saves,
    plan_uniform,
    uniform_rank,
)
from .lowrank import CalibratedLowRankConfig

DENSE = None  # the rank of a matrix that stays dense


def truncation_losses(sigma: Tensor, normalise: str = "relative") -> Tensor:
    """σ (k,) descending -> loss (k+1,) fp64 with loss[r] = Σ_{i>r} σ_i² (r = 0..k), divided by
    Σ σ_i² when `normalise` is "relative"."""
    energy = sigma.double().square()
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    if normalise == "relative":
        return tail / energy.sum().clamp_min(1e-300)
    return tail


def max_saving_rank(out_features: int, in_features: int) -> int:
    """The largest r < min(m, n) with r·(m+n) < m·n (0 when no rank saves parameters)."""
    return max(0, min(min(out_features, in_features) - 1, (out_features * in_features - 1) // (out_features + in_features)))


def allocate_ranks(
    spectra_losses: Mapping[str, Sequence[float] | Tensor],
    param_costs: Mapping[str, tuple[int, int]],
    budget: float,
    floors: Mapping[str, int],
    ceilings: Mapping[str, int],
) -> dict[str, int | None]:
    """Ranks that minimise Σ loss within `budget` parameters (greedy on loss per parameter).

    spectra_losses[name][r]: the loss of keeping r ranks (non-increasing in r, defined up to the
    ceiling). param_costs[name] = (parameters per rank = m+n, dense parameters = m·n).
    floors/ceilings: the smallest and largest factored rank; a ceiling at the break-even rank
    (the largest r with r·(m+n) < m·n) leaves dense (loss 0, cost m·n) as the next option, a lower
    ceiling does not. Returns {name: rank, or None = dense}. Raises ValueError when the floors
    alone exceed the budget.
    """
    options = {name: _options(spectra_losses[name], *param_costs[name], floors[name], ceilings[name])
               for name in spectra_losses}  # fmt: skip
    return allocate_options(options, budget)


def allocate_options(options: Mapping[str, list[tuple]], budget: float) -> dict:
    """{name: [(choice, parameters, loss)] with parameters increasing} -> {name: choice}: the
    greedy of `allocate_ranks` over arbitrary per-unit option lists, starting from each unit's
    first option. Raises ValueError when the first options alone exceed the budget."""
    spent = sum(opts[0][1] for opts in options.values())
    if spent > budget + 1e-9:
        raise ValueError(f"the floor ranks alone need {spent} parameters, more than the budget {budget:.0f}")
    chosen = _greedy(options, spent, budget)
    return {name: options[name][index][0] for name, index in chosen.items()}


def _options(losses, per_rank: int, dense: int, floor: int, ceiling: int) -> list[tuple]:
    """[(rank or None, parameters, loss)] from the floor rank up to the ceiling, then dense when the
    ceiling is the break-even rank."""
    rows = [(r, r * per_rank, float(losses[r])) for r in range(floor, ceiling + 1) if r >= 1]
    at_break_even = ceiling >= (dense - 1) // per_rank
    return rows + [(DENSE, dense, 0.0)] if at_break_even or not rows else rows


def _greedy(options: Mapping[str, list[tuple]], spent: float, budget: float) -> dict[str, int]:
    """Buy steps in order of loss removed per parameter while the budget lasts, from every unit's
    first option (`spent` parameters); returns {name: index of its chosen option}.

    Each matrix first offers the step to the next vertex of its lower convex hull of
    (parameters, loss), so its successive ratios fall and the global order is right. A hull step
    that no longer fits is replaced by the matrix's single next rank (then that matrix walks
    single ranks), so what is left of the budget is spent within one rank step."""
    state = {name: 0 for name in options}  # index into options[name]
    hull_next = {name: _hull_next(opts) for name, opts in options.items()}
    fine: set[str] = set()
    heap: list[tuple[float, str, int]] = []

    def push(name: str) -> None:
        opts, index = options[name], state[name]
        target = index + 1 if name in fine else hull_next[name][index]
        if target < len(opts):
            ratio = (opts[index][2] - opts[target][2]) / max(opts[target][1] - opts[index][1], 1e-12)
            heapq.heappush(heap, (-ratio, name, target))

    for name in options:
        push(name)
    while heap:
        _, name, target = heapq.heappop(heap)
        cost = options[name][target][1] - options[name][state[name]][1]
        if spent + cost > budget + 1e-9:
            if name not in fine and target > state[name] + 1:
                fine.add(name)  # the hull step is too big: walk this matrix one rank at a time
                push(name)
            continue  # a single step that does not fit ends this matrix's walk
        spent += cost
        state[name] = target
        push(name)
    return state


def _hull_next(opts: list[tuple]) -> list[int]:
    """next[i]: the lower-convex-hull vertex after option i (len(opts) past the last), for the
    hull vertices i (Andrew's monotone chain over (parameters, loss); parameters increase)."""
    hull: list[int] = []
    for i, (_, cost, loss) in enumerate(opts):
        while len(hull) >= 2:
            (_, c1, l1), (_, c2, l2) = opts[hull[-2]], opts[hull[-1]]
            # drop the middle point when it lies on or above the chord from hull[-2] to i
            if (l2 - l1) * (cost - c1) >= (loss - l1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(i)
    nexts = [len(opts)] * len(opts)
    for a, b in itertools.pairwise(hull):
        nexts[a] = b
    return nexts


def floor_rank(out_features: int, in_features: int, floor_ratio: float) -> int:
    """⌈floor_ratio·min(m, n)⌉, at least 1."""
    return max(1, math.ceil(floor_ratio * min(out_features, in_features) - 1e-9))


def aware_ranks(
    spectra: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: float,
    floor_ratio: float,
    normalise: str,
    keep: float = 1.0,
    spread: float = 0.0,
) -> tuple[dict[str, int | None], dict[str, Tensor]]:
    """({name: whitened σ}, {name: (m, n)}, parameter budget, ...) -> ({name: rank or None}, losses).

    Ranks lie in [⌈floor_ratio·min(m, n)⌉, break-even] or dense; with spread s > 1 also within
    [u/s, u·s] of the uniform rank u = ⌊keep·m·n/(m+n)⌋ (dense only when u·s reaches break-even).
    Matrices on which no rank saves parameters are dense and their m·n is taken off the budget."""
    losses = {name: truncation_losses(s, normalise) for name, s in spectra.items()}
    fixed = {n for n in spectra if max_saving_rank(*shapes[n]) < 1}
    free = [n for n in spectra if n not in fixed]
    ceilings = {n: max_saving_rank(*shapes[n]) for n in free}
    floors = {n: floor_rank(*shapes[n], floor_ratio) for n in free}
    if spread > 1:
        for n in free:
            u = max(uniform_rank(*shapes[n], keep), 1)
            floors[n] = max(floors[n], math.ceil(u / spread))
            ceilings[n] = min(ceilings[n], max(math.floor(u * spread), 1))
    floors = {n: min(floors[n], ceilings[n]) for n in free}
    costs = {n: (sum(shapes[n]), shapes[n][0] * shapes[n][1]) for n in free}
    rest = budget - sum(shapes[n][0] * shapes[n][1] for n in fixed)
    try:
        ranks = allocate_ranks({n: losses[n] for n in free}, costs, rest, floors, ceilings)
    except ValueError as error:
        raise ConfigError(
            f"aware allocation: {error}; raise `rank` (the keep ratio) or lower `floor_ratio`"
        ) from None
    return {**ranks, **{n: DENSE for n in fixed}}, losses


BLOCK_STEPS = 20  # block multipliers c = k / BLOCK_STEPS


def block_ranks(
    losses: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, int]],
    blocks: Mapping[str, str],
    budget: float,
    keep: float,
    spread: float,
    floor_ratio: float,
) -> tuple[dict[str, int | None], dict[str, float]]:
    """`aware_group: block`: one rank multiplier c per transformer block, ranks within a block
    in the uniform proportions: rank = ⌊keep·m·n/(m+n)⌋·c, rounded, clamped to
    [⌈floor_ratio·min(m, n)⌉, break-even]; c ∈ [1/spread, spread] in steps of 1/BLOCK_STEPS
    (spread 0: [1/BLOCK_STEPS, break-even]). A block's loss at c is the sum of its matrices'
    losses, and the multipliers are bought greedily by loss removed per parameter within
    `budget` (so it is met within one block step). Returns ({name: rank}, {block: c})."""

    members: dict[str, list[str]] = {}
    for name in losses:
        members.setdefault(blocks[name], []).append(name)
    low = 1 if spread == 0 else math.ceil(BLOCK_STEPS / spread - 1e-9)
    high = 10 * BLOCK_STEPS if spread == 0 else math.floor(BLOCK_STEPS * spread + 1e-9)

    def rank_at(name: str, k: int) -> int:
        m, n = shapes[name]
        rank = round(max(uniform_rank(m, n, keep), 1) * k / BLOCK_STEPS)
        return min(max(rank, floor_rank(m, n, floor_ratio)), max_saving_rank(m, n))

    options = {}
    for block, names in members.items():
        rows, last = [], None
        for k in range(low, high + 1):
            ranks = tuple(rank_at(n, k) for n in names)
            if ranks == last:
                continue  # clamped at every matrix's floor or ceiling: nothing new to buy
            last = ranks
            cost = sum(r * sum(shapes[n]) for r, n in zip(ranks, names))
            rows.append((k, cost, sum(float(losses[n][r]) for r, n in zip(ranks, names))))
        options[block] = rows
    chosen = allocate_options(options, budget)
    ranks = {n: rank_at(n, chosen[blocks[n]]) for n in losses}
    return ranks, {block: k / BLOCK_STEPS for block, k in chosen.items()}


FISHER_WINDOWS = 16


def output_fisher(model: nn.Module, linears: dict[str, nn.Module], config: CalibratedLowRankConfig,
                  ctx: Context) -> tuple[dict[str, Tensor], str]:
    """({name: E_t ‖∂ℓ_t/∂y_t‖² / m}, the report note): the mean squared gradient of the next-token
    loss ℓ_t with respect to each linear's output y_t (m features), over up to FISHER_WINDOWS
    calibration windows, one window per backward pass. With an isotropic Fisher F ≈ (E‖g‖²/m)·I,
    dropping output error e costs ≈ ½·eᵀF·e of loss, so this weight turns each matrix's whitened
    error (per token) into its end-to-end effect on the loss."""
    windows = calibration_windows(config, ctx)[0][:FISHER_WINDOWS]
    totals = {name: torch.zeros((), dtype=torch.float64) for name in linears}
    tokens = 0

    def track(name: str):
        def accumulate(grad: Tensor) -> None:
            totals[name].add_(grad.detach().double().square().sum().cpu())

        def hook(_module, _args, output):
            if output.requires_grad:
                output.register_hook(accumulate)

        return hook

    handles = [m.register_forward_hook(track(n)) for n, m in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_()))
    # By name: an accelerate-offloaded model swaps its parameter objects on every forward.
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for window in windows:
                ids = window[None].to(ctx.device)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                loss.backward()
                tokens += ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
    weights = {name: totals[name] / max(tokens, 1) / linear_out_features(m) for name, m in linears.items()}
    return weights, f"aware allocation: output Fisher weights from {len(windows)} calibration windows"


def linear_out_features(module: nn.Module) -> int:
    return linear_shape(module)[0]


@torch.no_grad()  # called before the driver's no_grad block: without it hooks would keep graphs
def dense_layer_stats(model: nn.Module, selected: dict[str, nn.Module], config: CalibratedLowRankConfig,
                      ctx: Context, consume: PhaseStep) -> list[str]:
    """The first pass of `allocation: aware`: stream the DENSE model block by block (nothing is
    compressed yet) and call consume({name: module}, {name: LayerStats}) once per block for its
    selected linears, while that block is on the calibration device (one phase: nothing changes
    between phases). Memory: one block's inputs and the Hessians of one block's linears. Returns
    the report notes about the calibration windows."""
    windows, notes = calibration_windows(config, ctx)
    calibrated_phases(model, selected, "hessian", windows, ctx, consume, batch_size=config.batch_size,
                      second_phase=(), description=f"{config.method_name}: spectra")
    return notes


def whitened_spectrum(weight: Tensor, chol: Tensor) -> Tensor:
    """Singular values of W·L (W (m, n), L (n, n)), fp64, descending."""
    return torch.linalg.svdvals(weight.double() @ chol.double())


def layer_spectrum(module: nn.Module, chol: Tensor) -> Tensor:
    with materialized(module):
        weight = linear_weight(module).detach()
    return whitened_spectrum(weight.to(chol.device), chol)


def aware_plan(model: nn.Module, selected: dict[str, nn.Module], shapes: dict[str, tuple[int, int]],
               config: CalibratedLowRankConfig, ctx: Context) -> tuple[dict[str, LayerPlan], list[str]]:
    """LayerPlans of `allocation: aware` and the report notes about them: dense-model whitened
    spectra (first pass), then `aware_ranks` under keep · Σ m·n parameters. Linears outside the
    blocks get no spectrum and stay dense (the sequential engine keeps them dense too)."""
    spectra: dict[str, Tensor] = {}
    blocks: dict[str, str] = {}  # matrix -> its block (consume is called once per block)
    block_index = itertools.count()

    def consume(linears: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
        factors: dict[int, Tensor] = {}  # q/k/v (gate/up) share one Hessian: one Cholesky
        block = f"block{next(block_index)}"
        for name, module in linears.items():
            blocks[name] = block
            key = id(stats[name])
            if key not in factors:
                factors[key] = cholesky_with_shift(stats[name].hessian(), getattr(config, "damping", 0.0))[0]
            spectra[name] = layer_spectrum(module, factors[key]).cpu()

    notes = dense_layer_stats(model, selected, config, ctx, consume)
    if config.aware_loss == "fisher":
        weights, fisher_note = output_fisher(model, {n: selected[n] for n in spectra}, config, ctx)
        notes.append(fisher_note)
        spectra = {n: s * weights[n].sqrt() for n, s in spectra.items()}  # σ² scales by the weight
    # The parameters the uniform plan keeps: aware ranks never hold more than uniform ones would.
    budget = sum(p.params_kept for p in plan_uniform(shapes, config.rank).values())
    outside = [n for n in shapes if n not in spectra]
    budget -= sum(shapes[n][0] * shapes[n][1] for n in outside)
    if config.aware_group == "block":
        ranks, losses, multipliers = aware_block_ranks(spectra, shapes, blocks, budget, config)
        notes.append("aware allocation: block multipliers " + " ".join(f"{c:g}" for c in multipliers.values()))
    else:
        ranks, losses = aware_ranks(spectra, {n: shapes[n] for n in spectra}, budget,
                                    config.floor_ratio, config.aware_loss, config.rank, config.rank_spread)
    plans = {name: aware_layer_plan(name, shape, ranks.get(name, DENSE), name in outside)
             for name, shape in shapes.items()}
    uniform = {n: uniform_loss(losses[n], *shapes[n], config.rank) for n in spectra}
    predicted = sum(float(losses[n][plans[n].r]) for n in spectra)
    notes.append(
        f"aware allocation ({config.aware_loss} losses, per {config.aware_group}, floor {config.floor_ratio:g}·full rank, "
        f"spread {config.rank_spread:g}): "
        f"predicted total truncation loss {predicted:.4g} vs {sum(uniform.values()):.4g} with uniform ranks; "
        f"{sum(1 for n in spectra if not plans[n].factored)} matrices kept dense"
    )
    return plans, notes


def aware_layer_plan(name: str, shape: tuple[int, int], r: int | None, outside: bool) -> LayerPlan:
    """The plan of one matrix at its aware rank `r` (None = dense: outside the blocks, or past the
    rank where factoring would save parameters)."""
    m, n = shape
    if r:
        return LayerPlan(name, m, n, r)
    if outside:
        return dense_plan(name, m, n, LayerStatus.SKIPPED_OUTSIDE_BLOCKS,
                          "outside the transformer blocks (no calibration inputs): dense")
    return dense_plan(name, m, n, LayerStatus.KEPT_DENSE_NO_SAVING,
                      AWARE_DENSE_REASON.format(ceiling=max_saving_rank(m, n), shape=f"{m}x{n}"))


def aware_block_ranks(spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]],
                      blocks: Mapping[str, str], budget: float, config: CalibratedLowRankConfig):
    """`block_ranks` on the spectra's losses; matrices with no saving rank stay dense."""
    losses = {name: truncation_losses(s, config.aware_loss) for name, s in spectra.items()}
    fixed = {n for n in spectra if max_saving_rank(*shapes[n]) < 1}
    free = {n: losses[n] for n in spectra if n not in fixed}
    rest = budget - sum(shapes[n][0] * shapes[n][1] for n in fixed)
    try:
        ranks, multipliers = block_ranks(free, shapes, blocks, rest, config.rank, config.rank_spread,
                                         config.floor_ratio)
    except ValueError as error:
        raise ConfigError(
            f"aware allocation: {error}; raise `rank` (the keep ratio), lower `floor_ratio` or widen `rank_spread`"
        ) from None
    return {**ranks, **{n: DENSE for n in fixed}}, losses, multipliers


AWARE_DENSE_REASON = ("aware allocation: dense (its tail costs more loss per parameter than other "
                      "layers'; any rank above {ceiling} on {shape} would not save parameters)")


def uniform_loss(losses: Tensor, m: int, n: int, keep: float) -> float:
    """The loss of the uniform rank ⌊keep·m·n/(m+n)⌋ on the same spectrum (0 when that stays dense)."""

    rank = uniform_rank(m, n, keep)
    return float(losses[rank]) if keep < 1 and factoring_saves(m, n, max(rank, 1)) else 0.0

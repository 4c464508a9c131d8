"""`allocation: aware`: the pure budgeted allocator (budget, optimality, never larger than dense)
and its defining property on a tiny model (less whitened truncation loss than uniform ranks at
the same parameters)."""

from __future__ import annotations

import itertools

import pytest
import torch

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.methods._lowrank_allocation import (
    allocate_ranks,
    aware_ranks,
    max_saving_rank,
    truncation_losses,
)
from compressor.methods.lowrank import LayerStatus, plan_layer, plan_uniform
from compressor.methods.saes_svd import SAESConfig
from compressor.methods.saes_svd import apply as saes_apply
from compressor.methods.svd import SVDConfig
from compressor.methods.svd_llm import SVDLLMConfig
from compressor.methods.svd_llm import apply as svd_llm_apply
from compressor.testing.tiny import tiny_llama


def decaying_spectrum(k: int, rate: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.exp(-rate * torch.arange(k, dtype=torch.float64)) * (1 + 0.1 * torch.rand(k, generator=g, dtype=torch.float64))).sort(descending=True).values


def total(losses, ranks, shapes) -> float:
    return sum(float(losses[n][r if r is not None else min(shapes[n])]) for n, r in ranks.items())


def spent(ranks, shapes) -> int:
    return sum(m * n if r is None else r * (m + n) for (m, n), r in ((shapes[k], ranks[k]) for k in ranks))


def setup(shapes, rates):
    losses = {n: truncation_losses(decaying_spectrum(min(shapes[n]), rates[n], i)) for i, n in enumerate(shapes)}
    costs = {n: (sum(shapes[n]), shapes[n][0] * shapes[n][1]) for n in shapes}
    ceilings = {n: max_saving_rank(*shapes[n]) for n in shapes}
    return losses, costs, ceilings


def brute_force(losses, costs, budget, floors, ceilings) -> float:
    """The least total loss over every rank (or dense) choice within the budget."""
    names = list(losses)
    choices = [[*range(floors[n], ceilings[n] + 1), None] for n in names]
    best = float("inf")
    for combo in itertools.product(*choices):
        cost = sum(costs[n][1] if r is None else r * costs[n][0] for n, r in zip(names, combo))
        if cost <= budget:
            best = min(best, sum(0.0 if r is None else float(losses[n][r]) for n, r in zip(names, combo)))
    return best


def test_truncation_losses_are_the_dropped_tail_energy():
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert truncation_losses(sigma, "absolute").tolist() == [14.0, 5.0, 1.0, 0.0]
    assert truncation_losses(sigma).tolist() == pytest.approx([1.0, 5 / 14, 1 / 14, 0.0])


def test_max_saving_rank_is_the_break_even_rank():
    assert max_saving_rank(64, 64) == 31 and 31 * 128 < 64 * 64 <= 32 * 128
    assert max_saving_rank(172, 64) == 46 and 46 * 236 < 172 * 64 <= 47 * 236
    assert max_saving_rank(1, 8) == 0


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7, 0.9])
def test_budget_is_hit_within_one_rank_step_and_never_exceeded(keep):
    shapes = {"a": (64, 64), "b": (32, 64), "c": (172, 64), "d": (64, 172)}
    losses, costs, ceilings = setup(shapes, {"a": 0.3, "b": 0.05, "c": 0.1, "d": 0.02})
    floors = {n: 1 for n in shapes}
    budget = keep * sum(m * n for m, n in shapes.values())
    ranks = allocate_ranks(losses, costs, budget, floors, ceilings)
    used = spent(ranks, shapes)
    assert used <= budget
    assert budget - used < max(m + n for m, n in shapes.values())
    for name, rank in ranks.items():  # a factored matrix is always smaller than dense
        assert rank is None or rank * sum(shapes[name]) < shapes[name][0] * shapes[name][1]


def test_equal_step_costs_greedy_is_optimal_by_brute_force():
    shapes = {"a": (6, 6), "b": (6, 6), "c": (6, 6)}  # 12 parameters per rank, break-even rank 2
    shapes = {"a": (10, 10), "b": (10, 10), "c": (10, 10)}  # break-even rank 4
    losses, costs, ceilings = setup(shapes, {"a": 1.0, "b": 0.2, "c": 0.5})
    floors = {n: 1 for n in shapes}
    for budget in range(60, 300, 20):
        ranks = allocate_ranks(losses, costs, budget, floors, ceilings)
        assert total(losses, ranks, shapes) == pytest.approx(brute_force(losses, costs, budget, floors, ceilings))


def test_mixed_costs_greedy_is_within_one_step_of_the_optimum():
    """Greedy on the convex hulls is optimal for the budget it reaches before the first step that
    does not fit, which is more than budget − the largest step: loss ≤ OPT(budget − max step)."""
    shapes = {"a": (12, 8), "b": (6, 10), "c": (16, 6)}
    losses, costs, ceilings = setup(shapes, {"a": 0.4, "b": 0.1, "c": 0.8})
    floors = {n: 1 for n in shapes}
    largest = max(max(m + n for m, n in shapes.values()), max(m * n for m, n in shapes.values()) // 4)
    for budget in range(60, 260, 15):
        ranks = allocate_ranks(losses, costs, budget, floors, ceilings)
        assert spent(ranks, shapes) <= budget
        assert total(losses, ranks, shapes) <= brute_force(losses, costs, budget - largest, floors, ceilings) + 1e-12
        assert total(losses, ranks, shapes) >= brute_force(losses, costs, budget, floors, ceilings) - 1e-12


def test_floors_bind_and_too_small_a_budget_is_refused():
    shapes = {"a": (64, 64), "b": (64, 64)}
    losses, costs, ceilings = setup(shapes, {"a": 2.0, "b": 0.01})
    ranks = allocate_ranks(losses, costs, 20 * 128, {"a": 8, "b": 8}, ceilings)
    assert ranks["a"] == 8 and ranks["b"] == 12
    with pytest.raises(ValueError, match="floor"):
        allocate_ranks(losses, costs, 10 * 128, {"a": 8, "b": 8}, ceilings)


def test_a_matrix_past_break_even_goes_dense_never_larger():
    shapes = {"flat": (64, 64), "steep": (64, 64)}
    losses = {"flat": truncation_losses(torch.ones(64, dtype=torch.float64), "absolute"),
              "steep": truncation_losses(decaying_spectrum(64, 1.0, 0), "absolute")}
    costs = {n: (128, 4096) for n in shapes}
    ceilings = {n: max_saving_rank(64, 64) for n in shapes}
    ranks = allocate_ranks(losses, costs, 4096 + 8 * 128, {n: 1 for n in shapes}, ceilings)
    assert ranks == {"flat": None, "steep": 8}


def test_spread_keeps_ranks_near_uniform():
    shapes = {"a": (64, 64), "b": (64, 64)}
    spectra = {"a": decaying_spectrum(64, 1.0, 0), "b": torch.ones(64, dtype=torch.float64)}
    ranks, _ = aware_ranks(spectra, shapes, 0.5 * 2 * 4096, 0.05, "relative", keep=0.5, spread=1.5)
    assert all(11 <= r <= 24 for r in ranks.values()) and ranks["a"] < ranks["b"]  # uniform 16
    free, _ = aware_ranks(spectra, shapes, 0.5 * 2 * 4096, 0.05, "relative")
    assert free["b"] is None or free["b"] > 24


def test_plan_layer_keeps_a_layer_dense_when_factoring_would_be_larger():
    plan = plan_layer("x", 64, 64, 40, 0.9)  # 40·128 > 64·64
    assert plan.status is LayerStatus.KEPT_DENSE_NO_SAVING and not plan.factored
    assert plan.r == 64 and plan.params_kept == 64 * 64 and "rank 40 would not save parameters" in plan.reason


def test_aware_is_refused_for_methods_without_whitened_spectra():
    with pytest.raises(ConfigError, match="aware.*svd-llm or saes-svd"):
        SVDConfig(rank=0.5, allocation="aware")
    with pytest.raises(ConfigError, match="aware_loss"):
        SVDLLMConfig(rank=0.5, allocation="aware", aware_loss="l2")
    with pytest.raises(ConfigError, match="rank_spread"):
        SAESConfig(rank=0.5, allocation="aware", rank_spread=0.5)


def _whitened_total(model, plans_ranks, spectra_losses):
    return sum(float(spectra_losses[n][r]) for n, r in plans_ranks.items())


@pytest.mark.parametrize("apply_fn, cls", [(svd_llm_apply, SVDLLMConfig), (saes_apply, SAESConfig)])
def test_aware_ranks_lose_less_whitened_energy_than_uniform_at_the_same_parameters(apply_fn, cls, stories):
    """The defining property on the real stories260K: at the parameters the uniform plan keeps,
    aware ranks drop less (relative) whitened energy, summed over the matrices, than uniform ranks
    on the same dense-model spectra."""
    from compressor.methods import _lowrank_allocation as alloc

    captured = {}
    original = alloc.aware_ranks

    def spy(spectra, shapes, budget, *args, **kwargs):
        captured.update(spectra=spectra, shapes=shapes, budget=budget)
        return original(spectra, shapes, budget, *args, **kwargs)

    ctx = Context(tokenizer=stories.tokenizer, quiet=True)
    config = cls(rank=0.5, allocation="aware", aware_group="matrix", aware_loss="relative", rank_spread=1.5,
                 num_windows=16, seq_len=64)
    alloc.aware_ranks = spy
    try:
        result = apply_fn(stories.model, config, ctx)
    finally:
        alloc.aware_ranks = original
    shapes = captured["shapes"]
    losses = {n: truncation_losses(s) for n, s in captured["spectra"].items()}
    uniform = plan_uniform(shapes, 0.5)
    aware = {row["module"]: row["rank"] for row in result.per_module}
    assert sum(r["params_kept"] for r in result.per_module) <= sum(p.params_kept for p in uniform.values())
    loss_uniform = sum(float(losses[n][uniform[n].r]) for n in shapes)
    loss_aware = sum(float(losses[n][aware[n]]) for n in shapes)
    assert loss_aware < 0.95 * loss_uniform
    assert any("aware allocation" in note for note in result.notes)


def test_a_rank_that_would_make_a_layer_larger_keeps_it_dense_with_a_row_and_a_note():
    """Issue 10: r > m·n/(m+n) keeps the layer dense and the report says so."""
    from compressor.methods.welore import WeLoreConfig
    from compressor.methods.welore import apply as welore_apply

    model = tiny_llama()
    result = welore_apply(model, WeLoreConfig(rank=0.97, min_ratio=0.0), Context.for_model(model))
    larger = [r for r in result.per_module if "would not save parameters" in str(r["status"])]
    assert larger and all(not r["factored"] and r["params_kept"] == r["params_dense"] for r in larger)
    note = next(n for n in result.notes if "kept dense because factoring" in n)
    assert larger[0]["module"] in note


def test_the_spectra_pass_builds_no_autograd_graph():
    """It runs before compress_model's no_grad block; a graph through every batch's Gram matrix
    held 8 GB on SmolLM2-135M before it was wrapped in no_grad."""
    from compressor.methods._lowrank_allocation import dense_layer_stats
    from compressor.targeting import select_linears

    model = tiny_llama()
    seen = []
    notes = dense_layer_stats(model, select_linears(model, (), ()), SVDLLMConfig(rank=0.5, num_windows=2, seq_len=16),
                              Context.for_model(model), lambda linears, stats: seen.extend(stats.values()))
    assert seen and not any(s.gram.requires_grad for s in seen)
    assert len(notes) == 1 and "only 2 calibration windows" in notes[0]  # returned, not appended to an argument

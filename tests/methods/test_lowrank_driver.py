"""The low-rank driver: a method supplies only its Factorization; plans are typed (integer `r`),
dense layers carry a LayerStatus, and results are returned, not written into arguments."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compressor.calibration import LayerStats
from compressor.context import Context
from compressor.layers import LowRankLinear
from compressor.methods._lowrank_allocation import aware_layer_plan
from compressor.methods._lowrank_driver import Factors, LowRankDriver, TruncatedSVD, dense_notes
from compressor.methods._lowrank_plan import LayerPlan, LayerStatus, plan_uniform
from compressor.methods.svd import SVDConfig
from compressor.methods.svd_llm import SVDLLMConfig
from compressor.testing.tiny import tiny_llama


class Recording:
    """A factorization that records what the driver hands it and returns plain SVD factors."""

    def __init__(self, stats_kind: str | None):
        self.stats_kind = stats_kind
        self.calls: list[tuple[str, int, LayerStats | None]] = []

    def factorize(self, name: str, weight: torch.Tensor, stats: LayerStats | None, r: int) -> Factors:
        self.calls.append((name, r, stats))
        return dataclasses.replace(TruncatedSVD().factorize(name, weight, stats, r), info={"seen": r},
                                   notes=(f"{name} at {r}",))


def test_the_driver_hands_each_layer_its_planned_integer_rank_and_installs_the_factors():
    model = tiny_llama()
    strategy = Recording(stats_kind=None)
    result = LowRankDriver(model, SVDConfig(rank=0.5), Context(quiet=True), strategy).run()
    shapes = {row["module"]: tuple(map(int, row["shape"].split("x"))) for row in result.per_module}
    planned = plan_uniform(shapes, 0.5)
    assert [(name, r) for name, r, _ in strategy.calls] == [(n, p.r) for n, p in planned.items() if p.factored]
    assert all(isinstance(r, int) and stats is None for _, r, stats in strategy.calls)
    for name, r, _ in strategy.calls:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == r
    rows = {row["module"]: row for row in result.per_module}
    assert all(rows[n]["status"] == "factored" and rows[n]["seen"] == r for n, r, _ in strategy.calls)
    assert result.notes[: len(strategy.calls)] == [f"{n} at {r}" for n, r, _ in strategy.calls]


def test_a_calibrated_factorization_gets_the_statistics_it_names():
    model = tiny_llama()
    strategy = Recording(stats_kind="hessian")
    config = SVDLLMConfig(rank=0.5, num_windows=2, seq_len=16)
    with pytest.warns(UserWarning, match="only 2 calibration windows"):
        result = LowRankDriver(model, config, Context.for_model(model, quiet=True), strategy).run()
    assert strategy.calls and all(stats is not None and stats.gram is not None for _, _, stats in strategy.calls)
    assert result.metrics["calibration_windows"] == 2 and result.metrics["layers_factored"] == len(strategy.calls)


def test_plans_are_frozen_and_a_dense_plan_keeps_its_full_rank():
    plan = LayerPlan("q", 64, 32, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.r = 11  # type: ignore[misc]
    dense = plan.kept_dense(LayerStatus.SKIPPED_OUTSIDE_BLOCKS, "outside")
    assert (plan.r, plan.params_kept, plan.factored) == (10, 960, True)
    assert (dense.r, dense.params_kept, dense.factored, dense.status) == (32, 2048, False,
                                                                          LayerStatus.SKIPPED_OUTSIDE_BLOCKS)


def test_the_no_saving_note_counts_layers_by_status_not_by_their_message():
    """The aware allocation's dense layers are no-saving layers whose reason is worded differently."""
    aware = aware_layer_plan("model.layers.0.mlp.up_proj", (64, 32), None, outside=False)
    outside = aware_layer_plan("lm_head", (64, 32), None, outside=True)
    assert aware.status is LayerStatus.KEPT_DENSE_NO_SAVING and "would not save" not in aware.reason.split(";")[0]
    assert outside.status is LayerStatus.SKIPPED_OUTSIDE_BLOCKS
    plans = {"q": LayerPlan("q", 64, 32, 10), aware.name: aware, outside.name: outside,
             "odd": LayerPlan("odd", 8, 8, 8, LayerStatus.KEPT_DENSE_NO_SAVING, "a message naming nothing")}
    notes = dense_notes(plans)
    assert notes[0].startswith("2 layer(s) kept dense because factoring") and notes[0].endswith(
        f"{aware.name}, odd")
    assert notes[1].startswith("3 of 4 targeted layers kept dense")
    assert dense_notes({"q": plans["q"]}) == []

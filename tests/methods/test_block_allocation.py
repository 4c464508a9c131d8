"""`allocation: aware` with `aware_group: block`: one rank multiplier per transformer block, ranks
in the uniform proportions inside a block; budget met within one block step and never exceeded,
floors / break-even respected, less predicted loss than uniform ranks at the same parameters."""

from __future__ import annotations

import pytest
import torch

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.methods._lowrank_allocation import (
    BLOCK_STEPS,
    block_ranks,
    floor_rank,
    max_saving_rank,
    truncation_losses,
)
from compressor.methods.lowrank import uniform_rank
from compressor.methods.saes_svd import SAESConfig
from compressor.methods.saes_svd import apply as saes_apply
from compressor.testing.tiny import tiny_llama

SHAPES = {f"b{b}.{t}": shape for b in range(4) for t, shape in
          (("q", (64, 64)), ("k", (32, 64)), ("up", (172, 64)), ("down", (64, 172)))}  # fmt: skip
BLOCKS = {name: name.split(".")[0] for name in SHAPES}


def losses_with_block_weights(weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Absolute tails of decaying spectra; block b's losses scaled by weights[b]."""
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        g = torch.Generator().manual_seed(i)
        sigma = (torch.exp(-0.05 * torch.arange(min(shape), dtype=torch.float64))
                 * (1 + 0.1 * torch.rand(min(shape), generator=g, dtype=torch.float64))).sort(descending=True).values
        out[name] = truncation_losses(sigma, "absolute") * weights[BLOCKS[name]]
    return out


def uniform_budget(keep: float) -> int:
    return sum(max(uniform_rank(m, n, keep), 1) * (m + n) for m, n in SHAPES.values())


def params(ranks) -> int:
    return sum(r * sum(SHAPES[n]) for n, r in ranks.items())


@pytest.mark.parametrize("keep", [0.4, 0.6])
def test_sensitive_blocks_get_more_rank_and_the_predicted_loss_falls(keep):
    losses = losses_with_block_weights({"b0": 8.0, "b1": 1.0, "b2": 1.0, "b3": 0.25})
    budget = uniform_budget(keep)
    ranks, multipliers = block_ranks(losses, SHAPES, BLOCKS, budget, keep, 1.5, 0.05)
    assert multipliers["b0"] > 1 > multipliers["b3"] and all(2 / 3 - 1e-9 <= c <= 1.5 for c in multipliers.values())
    uniform = {n: uniform_rank(*SHAPES[n], keep) for n in SHAPES}
    predicted = sum(float(losses[n][r]) for n, r in ranks.items())
    assert predicted < 0.9 * sum(float(losses[n][r]) for n, r in uniform.items())
    # budget: never exceeded, and what is left is less than the cheapest block step
    step = min(sum(max(uniform_rank(*SHAPES[n], keep), 1) * sum(SHAPES[n]) for n in SHAPES if BLOCKS[n] == b)
               for b in multipliers) / BLOCK_STEPS
    assert budget - 2 * step <= params(ranks) <= budget
    for name, rank in ranks.items():  # uniform proportions inside a block, floors and break-even
        m, n = SHAPES[name]
        expected = round(max(uniform_rank(m, n, keep), 1) * multipliers[BLOCKS[name]])
        assert rank == min(max(expected, floor_rank(m, n, 0.05)), max_saving_rank(m, n))


def test_equal_blocks_keep_the_uniform_ranks():
    losses = losses_with_block_weights({b: 1.0 for b in ("b0", "b1", "b2", "b3")})
    shapes = {n: SHAPES[n] for n in SHAPES}
    same = {n: losses["b0." + n.split(".")[1]] for n in shapes}  # identical spectra in every block
    ranks, multipliers = block_ranks(same, shapes, BLOCKS, uniform_budget(0.5), 0.5, 1.5, 0.05)
    assert len(set(multipliers.values())) <= 2  # at most one block bought the leftover step
    assert params(ranks) <= uniform_budget(0.5)


def test_block_group_on_a_tiny_model_reports_its_multipliers_and_stays_in_budget():
    model = tiny_llama()
    config = SAESConfig(rank=0.5, allocation="aware", aware_group="block", aware_loss="fisher",
                        num_windows=4, seq_len=32)
    result = saes_apply(model, config, Context.for_model(model))
    note = next(n for n in result.notes if n.startswith("aware allocation: block multipliers"))
    assert len(note.split()[4:]) == len(model.model.layers)
    uniform_kept = sum(max(uniform_rank(*map(int, r["shape"].split("x")), 0.5), 1)
                       * sum(map(int, r["shape"].split("x"))) for r in result.per_module)
    assert sum(r["params_kept"] for r in result.per_module) <= uniform_kept
    with pytest.raises(ConfigError, match="aware_group"):
        SAESConfig(rank=0.5, allocation="aware", aware_group="layer")

"""`heal` with `lora_r`: LoRA pairs on the low-rank layers and the remaining dense linears train
with the factors and merge exactly when training ends (low-rank: rank + r, dense: same size);
sparse layers get none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.adapters._heal_train import lora_hosts, lora_pairs
from compressor.adapters.heal import HealConfig, heal
from compressor.errors import ConfigError
from compressor.layers import LowRankLinear
from compressor.methods.prune import NMSparseLinear, PruneConfig
from compressor.methods.prune import apply as prune_apply
from compressor.methods.svd import SVDConfig
from compressor.methods.svd import apply as svd_apply


def test_merging_a_pair_gives_the_outputs_it_had_while_attached():
    torch.manual_seed(0)
    low = LowRankLinear.from_factors(torch.randn(12, 4), torch.randn(4, 10), torch.randn(12))
    dense = nn.Linear(10, 12)
    x = torch.randn(5, 10)
    plain = low(x), dense(x)
    with lora_pairs({"low": low, "dense": dense}, 3, seed=0) as params:
        assert set(params) == {f"{n}.heal_lora_{ab}" for n in ("low", "dense") for ab in "ab"}
        with torch.no_grad():
            for name, p in params.items():
                if name.endswith("_b"):
                    p.normal_()  # B starts at zero; a trained one is not
        during = low(x), dense(x)
        assert not any(torch.allclose(a, b) for a, b in zip(during, plain))
    after = low(x), dense(x)
    assert low.rank == 7 and low.u.shape == (12, 7) and low.v.shape == (7, 10)
    assert not any("heal_lora" in n for m in (low, dense) for n, _ in m.named_parameters())
    for before, merged in zip(during, after):
        torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)


def test_lora_heal_trains_pairs_on_factored_and_dense_linears(stories_model, short_fit):
    model, ctx = stories_model
    svd_apply(model, SVDConfig(rank=0.6, targets=("gate_proj", "up_proj", "down_proj")), ctx)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    attention = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("self_attn.q_proj")}
    embeddings = model.get_input_embeddings().weight.detach().clone()
    result = heal(model, HealConfig(lr=3e-3, lora_r=2, **short_fit), ctx)
    assert result.metrics["lora_layers"] == len(ranks) + 4 * len(attention) == 35
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == {
        n: r + 2 for n, r in ranks.items()}
    modules = dict(model.named_modules())
    assert all(not torch.equal(modules[n].weight, w) for n, w in attention.items())  # B·A merged in
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not any("heal_lora" in n for n in model.state_dict())
    assert result.metrics["perplexity_after"] < 0.9 * result.metrics["perplexity_before"]


def test_sparse_layers_get_no_lora_and_keep_their_mask(stories_model, short_fit):
    model, ctx = stories_model
    prune_apply(model, PruneConfig(pattern="2:4", score="magnitude"), ctx)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NMSparseLinear)}
    assert lora_hosts(model, layers) == {}
    heal(model, HealConfig(lr=3e-3, lora_r=4, **short_fit), ctx)
    for layer in layers.values():
        groups = (layer.dense_weight() != 0).reshape(layer.out_features, -1, 4).sum(-1)
        assert groups.max() <= 2


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_lora_r_must_be_a_non_negative_integer(bad):
    with pytest.raises(ConfigError, match="`lora_r` must be an integer >= 0"):
        HealConfig(lora_r=bad)

"""`heal`: only the compressed parameters train (embeddings, norms, dense layers and pruned
positions stay bit-identical), the loss falls on stories260K, N:M structure stays exact, and
distillation from the dense teacher works."""

from __future__ import annotations

import pytest
import torch

from compressor.adapters._heal_train import distillation_loss, healable_layers
from compressor.adapters.heal import HealConfig, heal
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.layers import LowRankLinear
from compressor.methods.prune import NMSparseLinear, PruneConfig
from compressor.methods.prune import apply as prune_apply
from compressor.methods.svd import SVDConfig
from compressor.methods.svd import apply as svd_apply
from compressor.registry import get_method
from compressor.testing.tiny import example_input_ids, tiny_llama


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def changed(model, before) -> set[str]:
    return {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}


def test_low_rank_heal_trains_only_the_factors_and_lowers_the_loss(stories_model, short_fit):
    model, ctx = stories_model
    svd_apply(model, SVDConfig(rank=0.6, targets=("gate_proj", "up_proj", "down_proj")), ctx)
    before = snapshot(model)
    result = heal(model, HealConfig(lr=3e-3, **short_fit), ctx)
    factors = {f"{n}.{f}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for f in ("u", "v")}
    assert changed(model, before) == factors and len(factors) == 30
    assert result.metrics["train_loss_last"] < result.metrics["train_loss_first"]
    assert result.metrics["perplexity_after"] < 0.9 * result.metrics["perplexity_before"]


def test_nm_heal_keeps_the_mask_exact_and_trains_only_values(stories_model, short_fit):
    model, ctx = stories_model
    prune_apply(model, PruneConfig(pattern="2:4", score="magnitude"), ctx)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NMSparseLinear)}
    masks = {n: m.dense_weight() != 0 for n, m in layers.items()}
    before = snapshot(model)
    result = heal(model, HealConfig(lr=3e-3, **short_fit), ctx)
    assert changed(model, before) == {f"{n}.values" for n in layers}
    for name, layer in layers.items():
        weight = layer.dense_weight()
        assert not (weight[~masks[name]] != 0).any()  # nothing grows outside the mask
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert groups.max() <= 2  # 2:4 exact
    assert result.metrics["perplexity_after"] < result.metrics["perplexity_before"]


def test_unstructured_pruned_zeros_stay_exactly_zero(stories_model, short_fit):
    model, ctx = stories_model
    prune_apply(model, PruneConfig(pattern="unstructured", sparsity=0.5, score="magnitude"), ctx)
    layers = healable_layers(model)
    zeros = {n: m.weight == 0 for n, m in layers.items()}
    before = snapshot(model)
    heal(model, HealConfig(lr=3e-3, weight_decay=0.1, **short_fit), ctx)
    assert changed(model, before) == {f"{n}.weight" for n in layers} and len(layers) == 35
    for name, layer in layers.items():
        assert (layer.weight[zeros[name]] == 0).all()
    with pytest.raises(ConfigError, match="mezo.*pruned zeros"):
        heal(model, HealConfig(optimizer="mezo", steps=1), ctx)


def test_dense_sparse_heal_trains_d_and_s_values_only(stories_model, short_fit):
    model, ctx = stories_model
    dsformer = get_method("dsformer")
    dsformer.apply(model, dsformer.config_cls(keep_bytes=0.6, init="plain", targets=(r"re:model\.layers\.0\.mlp\..*",), stf_steps=0), ctx)
    layers = healable_layers(model)
    before = snapshot(model)
    heal(model, HealConfig(lr=3e-3, **short_fit), ctx)
    assert changed(model, before) == {f"{n}.{p}" for n in layers for p in ("d", "s_values")}
    assert len(layers) == 3


def test_distillation_from_the_dense_teacher_lowers_the_kl(stories_model, short_fit):
    model, ctx = stories_model
    import copy

    teacher = copy.deepcopy(model)
    svd_apply(model, SVDConfig(rank=0.6), ctx)
    batch = {"input_ids": example_input_ids(4, 64)}
    kl = distillation_loss(teacher, 1.0)
    with torch.no_grad():
        before = kl(model, batch).item()
        assert kl(teacher, batch).item() == pytest.approx(0.0, abs=1e-6)
    heal(model, HealConfig(loss="kl", lr=3e-3, **short_fit), ctx, teacher=teacher)
    with torch.no_grad():
        assert kl(model, batch).item() < 0.8 * before


def test_a_compressed_teacher_and_an_uncompressed_model_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no compressed layers to heal"):
        heal(tiny_llama(), HealConfig(steps=1), Context(quiet=True))
    with pytest.raises(ConfigError, match="`loss` must be"):
        HealConfig(loss="mse")
    from compressor.models import save

    compressed = tiny_llama()
    svd_apply(compressed, SVDConfig(rank=0.5), Context.for_model(compressed))
    save(compressed, tmp_path / "c")
    from compressor.adapters._heal_train import load_teacher

    with pytest.raises(ConfigError, match="teacher .* holds compressed layers"):
        load_teacher(HealConfig(loss="kl", teacher=str(tmp_path / "c")), Context(quiet=True), compressed)

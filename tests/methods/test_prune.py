"""prune: exact N:M groups, unstructured counts, Wanda scores from real calibration norms, the
packed NMSparseLinear, checkpoints, Conv1D, and input errors."""

from __future__ import annotations

import pytest
import torch

import compressor
from compressor.calibration import (
    capture_block_inputs,
    capture_linear_inputs,
    run_block,
    transformer_blocks,
)
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.methods import prune
from compressor.testing.tiny import example_input_ids, tiny_gpt2, tiny_llama



@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_masks_have_exactly_n_per_group_and_keep_the_largest(n, m):
    weight = torch.randn(16, 32)
    mask = prune.magnitude_mask(weight, pattern=f"{n}:{m}")
    groups = mask.reshape(16, -1, m)
    assert bool((groups.sum(-1) == n).all())
    kept = (weight.abs() * mask).reshape(16, -1, m)
    dropped = (weight.abs() * ~mask).reshape(16, -1, m)
    assert bool((kept.masked_fill(~groups, float("inf")).amin(-1) >= dropped.amax(-1)).all())


def test_unstructured_masks_remove_exactly_the_requested_fraction():
    weight = torch.randn(10, 20)
    per_layer = prune.magnitude_mask(weight, sparsity=0.3)
    assert int((~per_layer).sum()) == 60
    assert float(weight.abs()[per_layer].min()) >= float(weight.abs()[~per_layer].max())
    per_row = prune.unstructured_mask(weight.abs(), 0.25, per_row=True)
    assert bool(((~per_row).sum(1) == 5).all())


def test_wanda_scores_weight_magnitudes_by_input_norms():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    norms = torch.tensor([10.0, 1.0])
    torch.testing.assert_close(
        prune.wanda_scores(weight, norms), torch.tensor([[10.0, 2.0], [30.0, 0.5]])
    )
    # magnitude keeps -2 in row 0; Wanda keeps the 1.0 fed by a 10x larger input
    assert prune.unstructured_mask(weight.abs(), 0.5, per_row=True)[0].tolist() == [False, True]
    assert prune.unstructured_mask(prune.wanda_scores(weight, norms), 0.5, per_row=True)[
        0
    ].tolist() == [True, False]


def test_nm_sparse_linear_packs_and_matches_the_masked_weight():
    weight = torch.randn(12, 16)
    pruned = weight * prune.magnitude_mask(weight, pattern="2:4")
    bias = torch.randn(12)
    layer = prune.NMSparseLinear.from_dense(pruned, 2, 4, bias)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), x @ pruned.T + bias)
    torch.testing.assert_close(layer.dense_weight(), pruned)
    assert layer.indices.dtype == torch.uint8 and layer.indices.shape == (
        12,
        2,
    )  # 8 positions x 2 bits
    sizes = prune.nm_sparse_bytes(12, 16, 2, 4, 4)
    assert sizes["total_bytes"] == 12 * (8 * 4 + 2)


def test_wanda_uses_the_calibration_input_norms():
    model = tiny_llama()
    reference = tiny_llama()
    ctx = Context.for_model(model, quiet=True)
    config = prune.PruneConfig(
        score="wanda",
        pattern="unstructured",
        sparsity=0.5,
        num_windows=4,
        seq_len=32,
        targets=("layers.0.self_attn.q_proj",),
    )
    result = prune.apply(model, config, ctx)
    # recompute ||X_j|| for the first block's q_proj (it sees the unpruned embeddings) by hand
    windows = ctx.windows("default", split="calib", seq_len=32, num_windows=4)
    _, block = transformer_blocks(reference)[0]
    q_proj = reference.model.layers[0].self_attn.q_proj
    squares = []
    with capture_linear_inputs({"q": q_proj}, lambda _, x: squares.append(x.square().sum(0))):
        run_block(block, capture_block_inputs(reference, windows, batch_size=8))
    norms = torch.stack(squares).sum(0).sqrt()
    expected = prune.unstructured_mask(prune.wanda_scores(q_proj.weight, norms), 0.5, per_row=True)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight != 0, expected)
    assert result.per_module[0]["score"] == "wanda" and result.metrics["sparsity"] == 0.5
    assert not torch.equal(expected, prune.magnitude_mask(q_proj.weight, 0.5, per_row=True))


def test_two_four_layers_keep_two_of_every_four():  # save / reload / merge: tests/test_contract.py
    model = tiny_llama()
    result = prune.apply(model, prune.PruneConfig(), Context.for_model(model, quiet=True))
    assert result.metrics["sparsity"] == 0.5
    assert result.metrics["keep_ratio_bytes"] == pytest.approx((0.5 * 4 + 0.5 * 0.25) / 4, abs=1e-4)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, prune.NMSparseLinear)
    assert bool(((layer.dense_weight().reshape(64, -1, 4) != 0).sum(-1) == 2).all())


def test_gpt2_conv1d_layers_are_pruned_in_their_own_layout():
    model = tiny_gpt2()
    ids = example_input_ids()
    weight = model.transformer.h[0].mlp.c_fc.weight.detach().clone()  # Conv1D: (in, out)
    prune.apply(
        model,
        prune.PruneConfig(pattern="unstructured", sparsity=0.5, targets=("c_fc",)),
        Context.for_model(model, quiet=True),
    )
    pruned = model.transformer.h[0].mlp.c_fc.weight
    assert int((pruned == 0).sum()) == weight.numel() // 2
    assert torch.equal(pruned != 0, prune.magnitude_mask(weight.T, 0.5).T)
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"pattern": "4:2"}, r"`pattern`.*0 < N < M"),
        ({"pattern": "half"}, r"`pattern`.*'N:M'"),
        ({"sparsity": 1.0}, r"`sparsity`.*\[0, 1\)"),
        ({"score": "random"}, r"`score`"),
        ({"num_windows": 0}, r"`num_windows`"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        prune.PruneConfig.from_dict(fields)


def test_nm_pattern_that_does_not_divide_in_features_names_the_layers():
    model = tiny_llama(intermediate=66)
    with pytest.raises(
        ConfigError,
        match=r"`pattern`='2:4' needs in_features divisible by M=4.*layers.0.mlp.down_proj \(in_features=66\)",
    ):
        prune.apply(model, prune.PruneConfig(), Context.for_model(model, quiet=True))


def test_pruning_a_factored_layer_stores_its_pruned_dense_product():
    from compressor.layers import LowRankLinear

    model = tiny_llama()
    target = "layers.0.mlp.up_proj"
    factored = LowRankLinear.from_factors(torch.randn(64, 4), torch.randn(4, 32))
    compressor.targeting.replace_module(model, "model." + target, factored)
    product = factored.dense_weight().detach()
    result = prune.apply(
        model,
        prune.PruneConfig(pattern="unstructured", sparsity=0.75, targets=(target,)),
        Context.for_model(model, quiet=True),
    )
    layer = model.get_submodule("model." + target)
    assert type(layer) is torch.nn.Linear
    torch.testing.assert_close(layer.weight, product * prune.magnitude_mask(product, 0.75))
    assert result.per_module[0]["sparsity"] == 0.75

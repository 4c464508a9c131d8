import pytest
import torch

from compressor.adapters import dsee
from compressor.adapters.dsee import DseeConfig, DseeLinear
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.models import default_tokenizer
from compressor.testing.tiny import example_input_ids, tiny_llama

FAST = {"r": 4, "num_sparse": 8, "grebsmo_iterations": 4}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ctx(**kwargs):
    return Context(quiet=True, tokenizer=default_tokenizer(), **kwargs)


def test_grebsmo_finds_the_planted_sparse_entries():
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.randn(40, 2, generator=generator) @ torch.randn(2, 30, generator=generator)
    planted = torch.randperm(1200, generator=generator)[:25]
    spikes = torch.zeros(1200)
    spikes[planted] = 3.0 * torch.sign(torch.randn(25, generator=generator))
    weight = low_rank * 0.1 + spikes.view(40, 30)
    u, v, s = dsee.grebsmo(weight, iterations=20, inner=2, threshold=0.01, rank_step=1, max_rank=2)
    assert u.shape == (40, 2) and v.shape == (2, 30)
    torch.testing.assert_close(u.T @ u, torch.eye(2), rtol=0, atol=1e-5)  # U from a QR: orthonormal
    rows, cols = dsee.top_support(s, 25)
    assert set((rows * 30 + cols).tolist()) == set(planted.tolist())


def test_grebsmo_rank_grows_by_step_and_stops_at_the_cap():
    weight = torch.randn(20, 16)
    u, v, _ = dsee.grebsmo(weight, iterations=3, rank_step=2, max_rank=100)
    # Rank 1 + (3 - 1) * 2: V does not grow after the last fit, so U V is the fitted product.
    assert u.shape == (20, 5) and v.shape == (5, 16)
    _, v, _ = dsee.grebsmo(weight, iterations=10, rank_step=5, max_rank=8)
    assert v.shape[0] == 8


def test_top_support_and_global_masks():
    scores = torch.tensor([[0.1, -5.0, 0.3], [2.0, 0.0, -0.2]])
    rows, cols = dsee.top_support(scores, 2)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    scores = {"a": torch.tensor([[1.0, 4.0]]), "b": torch.tensor([[3.0, 2.0, 5.0, 0.5]])}
    masks = dsee.global_magnitude_masks(scores, 0.5)  # the 3 smallest of 6 go, wherever they are
    assert masks["a"].tolist() == [[False, True]]
    assert masks["b"].tolist() == [[True, False, True, False]]
    assert dsee.layer_flops(8, 4, 16, (2, 3)) == 2 * (16 + 2 * 12 + 3)


def test_init_leaves_outputs_unchanged():
    model, ids = tiny_llama(), example_input_ids()
    before = _logits(model, ids)
    layers = dsee.install_dsee(model, DseeConfig(**FAST), _ctx(), seed=0)
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert torch.equal(_logits(model, ids), before)


def test_sparse_update_touches_only_omega_and_pruned_zeros_survive_retuning():
    model = tiny_llama()
    config = DseeConfig(
        **FAST,
        steps=4,
        retune_steps=3,
        batch_size=2,
        seq_len=16,
        num_eval=2,
        lr=0.05,
        prune_ratio=0.4,
    )
    result = dsee.apply(model, config, _ctx())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DseeLinear)}
    assert len(layers) == 4
    for layer in layers.values():
        s2 = layer.sparse_delta()
        on_omega = torch.zeros_like(s2, dtype=torch.bool)
        on_omega[layer.delta_rows, layer.delta_cols] = True
        assert torch.count_nonzero(s2[~on_omega]) == 0
        assert torch.count_nonzero(s2[on_omega]) > 0  # training did move S2 on its support
    # Global magnitude pruning over every linear removed 40% of their weights in total, and
    # re-tuning (LoRA + S2 only) left the zeros in place.
    weights = [
        m.weight
        for n, m in model.named_modules()
        if isinstance(m, (DseeLinear, torch.nn.Linear)) and n != "lm_head"
    ]
    zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
    assert zeros == int(0.4 * total)
    assert result.metrics["pruned_layers"] == 14
    assert result.metrics["method_params"] == sum(
        4 * (m.in_features + m.out_features) + 8 for m in layers.values()
    )
    # 40 % of the weights are gone, minus what the adapters cost.
    assert 0.3 < result.metrics["flops_saved_fraction"] < 0.4


def test_nm_pruning_keeps_n_of_every_m():  # save / reload / merge: tests/test_contract.py
    model = tiny_llama()
    config = DseeConfig(
        **FAST,
        steps=2,
        retune_steps=2,
        batch_size=2,
        seq_len=16,
        num_eval=2,
        lr=0.05,
        prune="2:4",
        prune_targets=("re:.*mlp.*",),
    )
    dsee.apply(model, config, _ctx())
    up = model.model.layers[0].mlp.up_proj.weight
    assert (up.view(up.shape[0], -1, 4) != 0).sum(-1).max() <= 2


def test_lowers_held_out_perplexity_on_stories260k(stories_model, short_fit):
    model, ctx = stories_model
    config = DseeConfig(num_sparse=16, grebsmo_iterations=10, lr=3e-3, prune_ratio=0.2, **short_fit)
    metrics = dsee.apply(model, config, ctx).metrics
    assert metrics["perplexity_after"] < 0.97 * metrics["perplexity_before"]  # tuning LoRA + S2
    # Pruning 20% of all weights costs perplexity; re-tuning on the pruned backbone wins part back.
    assert metrics["retune_perplexity_after"] < 0.95 * metrics["retune_perplexity_before"]


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"prune": "4:2"}, "`prune` must be 'unstructured', 'none' or 'N:M'"),
        ({"prune_ratio": 1.0}, "`prune_ratio` is the fraction of weights removed"),
        ({"sparse_method": "omp"}, "`sparse_method` must be"),
        ({"grebsmo_max_rank": 0.0}, "`grebsmo_max_rank`"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        DseeConfig(**fields)

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor.adapters import nola
from compressor.adapters.nola import NolaConfig, NolaLinear
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.testing.tiny import example_input_ids, tiny_gpt2, tiny_llama

SMALL = {"r": 4, "num_basis_a": 24, "num_basis_b": 20}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_bases_are_seeded_uniform_and_chunking_does_not_change_them():
    bases = nola.random_bases(11, 200, 30)
    assert bases.shape == (200, 30)
    assert torch.equal(bases, nola.random_bases(11, 200, 30))
    assert not torch.equal(bases, nola.random_bases(12, 200, 30))
    bound = 1 / 200**0.5
    assert bases.abs().max() <= bound and bases.abs().max() > 0.95 * bound  # U(-1,1)/sqrt(k)
    # One generator call per chunk equals one call for everything (CPU streams are sequential).
    whole = (
        torch.empty(200, 30).uniform_(-1, 1, generator=torch.Generator().manual_seed(11)) * bound
    )
    torch.testing.assert_close(bases, whole, rtol=0, atol=1e-7)


def test_seeded_combination_matches_explicit_bases_in_value_and_gradient():
    coef = torch.randn(70, requires_grad=True)
    out = nola.combine_bases(coef, 5, 6, 9)
    explicit_coef = coef.detach().clone().requires_grad_(True)
    explicit = (explicit_coef @ nola.random_bases(5, 70, 54)).view(6, 9)
    torch.testing.assert_close(out, explicit, rtol=1e-5, atol=1e-6)
    weight = torch.randn(6, 9)
    (out * weight).sum().backward()
    (explicit * weight).sum().backward()
    torch.testing.assert_close(coef.grad, explicit_coef.grad, rtol=1e-5, atol=1e-6)


def test_init_leaves_outputs_unchanged_and_gradients_reach_b_coefficients():
    model, ids = tiny_llama(), example_input_ids()
    before = _logits(model, ids)
    layers = nola.install_nola(model, NolaConfig(**SMALL), base_seed=0)
    assert torch.equal(_logits(model, ids), before)
    model(ids, labels=ids).loss.backward()
    layer = next(iter(layers.values()))
    assert layer.nola_coef_b.grad.abs().sum() > 0  # training starts: A = A0 != 0, B = 0
    assert torch.count_nonzero(layer.nola_coef_a.grad) == 0  # d/dA vanishes while B = 0


def test_trainable_count_is_exactly_k_plus_l_per_layer():
    model = tiny_llama()
    layers = nola.install_nola(model, NolaConfig(**SMALL), base_seed=0)
    params = nola.coefficient_params(model)
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert sum(p.numel() for p in params.values()) == len(layers) * (24 + 20)
    for layer in layers.values():
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 24 + 20


def test_cached_and_regenerated_bases_give_the_same_layer():
    linear = torch.nn.Linear(12, 10)
    kwargs = {"rank": 3, "num_basis_a": 70, "num_basis_b": 65, "alpha": 4.0, "seed": 123}
    fresh, cached = (
        NolaLinear.from_linear(linear, **kwargs),
        NolaLinear.from_linear(linear, cache_bases=True, **kwargs),
    )
    with torch.no_grad():
        for layer in (fresh, cached):
            layer.nola_coef_a.copy_(torch.linspace(-1, 1, 70))
            layer.nola_coef_b.copy_(torch.linspace(1, -2, 65))
    x = torch.randn(5, 12)
    torch.testing.assert_close(fresh(x), cached(x), rtol=1e-5, atol=1e-6)
    assert cached.basis_cache_bytes() == (70 * 3 * 12 + 65 * 10 * 3) * 4
    # Never persistent: the checkpoint holds the base, the coefficients and nothing else.
    assert set(cached.state_dict()) == {"weight", "bias", "nola_coef_a", "nola_coef_b"}


def _trained_tiny(tmp_path, **overrides):
    model = tiny_llama()
    ctx = Context(quiet=True, out_dir=tmp_path, tokenizer=_tokenizer())
    config = NolaConfig(
        **SMALL, steps=3, batch_size=2, seq_len=16, num_eval=2, lr=0.05, **overrides
    )
    result = nola.apply(model, config, ctx)
    return model, result


def _tokenizer():
    from compressor.models import default_tokenizer

    return default_tokenizer()


def test_saved_adapter_holds_coefficients_and_seeds_only(tmp_path):
    model, result = _trained_tiny(tmp_path)
    tensors = load_file(result.artifacts["adapter"])
    names = [n for n, m in model.named_modules() if isinstance(m, NolaLinear)]
    expected = {f"{n}.{key}" for n in names for key in ("nola_coef_a", "nola_coef_b", "nola_seed")}
    assert set(tensors) == expected
    for name in names:
        assert tensors[f"{name}.nola_coef_a"].shape == (24,)
        assert tensors[f"{name}.nola_coef_b"].shape == (20,)
        seed = tensors[f"{name}.nola_seed"]
        assert seed.dtype == torch.int64 and seed.numel() == 1
    assert result.metrics["method_params"] == len(names) * 44
    assert result.metrics["trainable_params"] == len(names) * 44  # what the trainer trained
    lora_same_rank = sum(
        4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, NolaLinear)
    )
    assert result.metrics["lora_params_same_rank"] == lora_same_rank
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "nola" and sorted(config["target_modules"]) == sorted(names)


def test_adapter_reloads_onto_a_fresh_base_with_the_same_outputs(tmp_path):
    model, _ = _trained_tiny(tmp_path)
    ids = example_input_ids()
    fresh = tiny_llama()
    assert not torch.allclose(
        _logits(fresh, ids), _logits(model, ids)
    )  # training changed something
    nola.load_nola_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_merge_true_folds_the_adapter_with_the_same_outputs(tmp_path):  # round trip: test_contract.py
    model, _ = _trained_tiny(tmp_path / "run")
    ids = example_input_ids()
    trained = _logits(model, ids)
    merged, _ = _trained_tiny(tmp_path / "merged", merge=True)
    assert not any(isinstance(m, NolaLinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=1e-5, atol=1e-5)


def test_conv1d_base_is_adapted_with_unchanged_init():
    model, ids = tiny_gpt2(), example_input_ids()
    before = _logits(model, ids)
    layers = nola.install_nola(
        model, NolaConfig(**SMALL, targets=("c_attn", "c_proj")), base_seed=1
    )
    assert len(layers) == 6  # c_attn, attn.c_proj, mlp.c_proj in 2 blocks
    assert all(isinstance(model.get_submodule(n), NolaLinear) for n in layers)
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-6)


def test_lowers_held_out_perplexity_on_stories260k(stories_model, short_fit):
    model, ctx = stories_model
    config = NolaConfig(
        r=8, num_basis_a=64, num_basis_b=64, cache_bases=True, lr=2e-2, **short_fit
    )
    result = nola.apply(model, config, ctx)
    assert result.metrics["perplexity_after"] < 0.97 * result.metrics["perplexity_before"]


def test_mezo_trains_only_the_coefficients():
    model = tiny_llama()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = NolaConfig(
        **SMALL, optimizer="mezo", steps=3, batch_size=2, seq_len=16, num_eval=2, lr=1e-2
    )
    result = nola.apply(model, config, Context(quiet=True, tokenizer=_tokenizer()))
    assert result.metrics["method_params"] == 14 * 44
    moved = [n for n, p in nola.coefficient_params(model).items() if p.abs().sum() > 0]
    assert moved, "MeZO should move the coefficients"
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, NolaLinear)):
        assert torch.equal(layer.weight, weights[f"{name}.weight"])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("r", 0, "`r` must be an integer >= 1"),
        ("num_basis_a", -3, "`num_basis_a` must be an integer >= 1"),
        ("alpha", 0.0, "`alpha` must be > 0"),
    ],
)
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        NolaConfig(**{field: value})

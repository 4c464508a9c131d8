import math

import pytest
import torch

from compressor.adapters import kappatune
from compressor.adapters.kappatune import KappaTuneConfig
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.layers import LoraLinear
from compressor.models import load_model
from compressor.testing.tiny import tiny_llama


def independent_kappas(model) -> dict[str, float]:
    """κ = s_max / (s_min + 1e-8) by torch.linalg.svdvals, for every linear except lm_head."""
    kappas = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            s = torch.linalg.svdvals(module.weight.detach().float())
            kappas[name] = float(s[0] / (s[-1] + 1e-8))
    return kappas


def test_selects_exactly_the_lowest_kappa_tensors():
    model = load_model(None).model
    expected = independent_kappas(model)
    ranked = sorted(expected, key=expected.get)
    kappas, _ = kappatune.condition_numbers(model, KappaTuneConfig(), Context(quiet=True))
    assert set(kappas) == set(expected)
    for name in expected:
        assert math.isclose(kappas[name], expected[name], rel_tol=1e-4)
    # top_p 0.2 of 35 candidates -> floor(7.0) = 7 tensors, the 7 lowest.
    assert kappatune.select_modules(kappas, KappaTuneConfig()) == ranked[:7]
    assert kappatune.select_modules(kappas, KappaTuneConfig(num_modules=3)) == ranked[:3]
    cut = expected[ranked[10]]
    assert kappatune.select_modules(kappas, KappaTuneConfig(threshold=cut)) == ranked[:11]
    at_least_one = kappatune.select_modules(kappas, KappaTuneConfig(top_p=0.01))
    assert at_least_one == ranked[:1]


def test_max_dim_drops_large_tensors():
    model = tiny_llama()  # hidden 32, MLP 64
    kappas, _ = kappatune.condition_numbers(model, KappaTuneConfig(max_dim=32), Context(quiet=True))
    assert kappas and not any("mlp" in name for name in kappas)


def test_full_mode_trains_only_the_selected_weights(stories_model, short_fit):
    model, ctx = stories_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = kappatune.apply(
        model, KappaTuneConfig(mode="full", num_modules=4, lr=1e-3, **short_fit), ctx
    )
    chosen = {row["module"] for row in result.per_module if row["selected"]}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.weight" for n in chosen} and len(chosen) == 4
    assert result.metrics["method_params"] == sum(
        model.get_submodule(n).weight.numel() for n in chosen
    )
    assert result.metrics["perplexity_after"] < result.metrics["perplexity_before"]


def test_lora_mode_adapts_the_selected_modules_and_lowers_perplexity(stories_model, short_fit):
    model, ctx = stories_model
    expected = independent_kappas(model)
    lowest = set(sorted(expected, key=expected.get)[:7])
    result = kappatune.apply(model, KappaTuneConfig(lr=2e-3, **short_fit), ctx)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert adapted == lowest
    assert result.metrics["selected"] == 7 and result.metrics["candidates"] == 35
    assert result.metrics["kappa_max_selected"] <= result.metrics["kappa_min_unselected"]
    assert result.metrics["perplexity_after"] < 0.97 * result.metrics["perplexity_before"]


def test_second_selection_reads_the_spectra_cache():
    model = tiny_llama(seed=5)
    _, hits_first = kappatune.condition_numbers(model, KappaTuneConfig(), Context(quiet=True))
    _, hits_second = kappatune.condition_numbers(model, KappaTuneConfig(), Context(quiet=True))
    assert hits_first == 0 and hits_second == 14


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"top_p": 0.2, "num_modules": 3}, "set one of `top_p`, `num_modules`, `threshold`"),
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
        ({"mode": "partial"}, "`mode` must be 'full' or 'lora'"),
        ({"lora_r": 0}, "`lora_r` must be an integer >= 1"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        KappaTuneConfig(**fields)


def test_threshold_below_every_kappa_is_a_clear_error():
    with pytest.raises(ConfigError, match="no tensor has κ <= `threshold`"):
        kappatune.apply(tiny_llama(), KappaTuneConfig(threshold=1e-3), Context(quiet=True))

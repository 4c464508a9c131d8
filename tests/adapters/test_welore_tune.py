import pytest
import torch

from compressor.adapters import welore_tune
from compressor.adapters.welore_tune import WeLoreTuneConfig
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.layers import LowRankLinear
from compressor.targeting import replace_module, select_linears
from compressor.testing.tiny import tiny_llama


def factor_mlp_up_and_gate(model, rank: int) -> list[str]:
    """Stand-in for a WeLore output: truncated-SVD LowRankLinear on gate/up, the rest dense."""
    names = list(select_linears(model, ("gate_proj", "up_proj")))
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s[:rank].sqrt()
        replace_module(
            model, name, LowRankLinear.from_factors(u[:, :rank] * root, root[:, None] * vh[:rank])
        )
    return names


def test_trains_only_the_low_rank_factors_and_lowers_perplexity(stories_model, short_fit):
    model, ctx = stories_model
    names = factor_mlp_up_and_gate(model, rank=24)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = welore_tune.apply(model, WeLoreTuneConfig(lr=3e-3, **short_fit), ctx)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.{f}" for n in names for f in ("u", "v")}
    assert result.metrics["lrc_layers"] == 10
    assert result.metrics["method_params"] == 10 * 24 * (64 + 172)
    assert result.metrics["perplexity_after"] < 0.97 * result.metrics["perplexity_before"]


def test_targets_restrict_the_tuned_components():
    model = tiny_llama()
    factor_mlp_up_and_gate(model, rank=4)
    layers = welore_tune.low_rank_components(
        model, targets=("up_proj",), ignore=("layers.1.mlp.up_proj",)
    )
    assert list(layers) == ["model.layers.0.mlp.up_proj"]


def test_a_model_without_low_rank_layers_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="no low-rank .* `compressor compress --method welore"):
        welore_tune.apply(tiny_llama(), WeLoreTuneConfig(), Context(quiet=True))

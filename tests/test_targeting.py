import pytest
import torch

from compressor.errors import ConfigError
from compressor.layers import LowRankLinear, merge_compressed
from compressor.targeting import linear_weight, replace_module, select_linears
from compressor.testing import tiny_gpt2, tiny_llama


def test_default_selection_excludes_head_and_embeddings():
    names = set(select_linears(tiny_llama()))
    assert len(names) == 2 * 7
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_suffix_regex_and_ignore():
    model = tiny_llama()
    assert set(select_linears(model, ["q_proj"])) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert set(select_linears(model, ["re:.*layers\\.1\\.mlp\\..*"])) == {
        f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    assert len(select_linears(model, ignore=["re:.*mlp.*"])) == 8
    assert "lm_head" in select_linears(model, ["lm_head"])


def test_no_match_lists_real_names():
    with pytest.raises(ConfigError, match=r"matched no linear.*q_proj"):
        select_linears(tiny_llama(), ["qproj"])


def test_conv1d_weight_is_out_by_in():
    model = tiny_gpt2()
    layers = select_linears(model, ["c_fc"])
    module = next(iter(layers.values()))
    x = torch.randn(3, 32)
    assert torch.allclose(module(x), x @ linear_weight(module).t() + module.bias, atol=1e-5)


def test_low_rank_full_rank_reproduces_and_merges():
    linear = torch.nn.Linear(12, 10)
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    layer = LowRankLinear.from_factors(u * s, vh, linear.bias.detach())
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), linear(x), atol=1e-5)
    model = torch.nn.Sequential(layer)
    assert merge_compressed(model) == 1
    assert isinstance(model[0], torch.nn.Linear)
    assert torch.allclose(model(x), linear(x), atol=1e-5)
    replace_module(model, "0", linear)
    assert model[0] is linear

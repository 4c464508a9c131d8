import json

import peft
import pytest
import torch

from compressor.adapters import _peft_lora, lora
from compressor.adapters.lora import LoraConfig
from compressor.errors import ConfigError
from compressor.layers import LoraLinear, LowRankLinear, merge_compressed
from compressor.models import load_model
from compressor.targeting import replace_module
from compressor.testing.tiny import example_input_ids, tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_init_leaves_outputs_unchanged():
    model, ids = tiny_llama(), example_input_ids()
    before = _logits(model, ids)
    _peft_lora.inject_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8, dropout=0.0)
    assert len(_peft_lora.peft_layers(model)) == 6
    assert torch.equal(_logits(model, ids), before)


def test_stage_writes_a_peft_adapter_that_plain_peft_loads_with_the_same_logits(out_ctx, short_fit):
    model = load_model(None).model
    ids = example_input_ids(seed=3)
    before = _logits(model, ids)
    result = lora.apply(model, LoraConfig(lr=3e-3, **short_fit), out_ctx)
    tuned = _logits(model, ids)
    assert not torch.allclose(tuned, before, atol=1e-3)
    metrics = result.metrics
    assert metrics["perplexity_after"] < 0.97 * metrics["perplexity_before"]  # held-out text
    # Every attention + MLP linear (5 blocks x 7), not lm_head or embeddings; peft's format on disk.
    adapter = out_ctx.out_dir / "adapter"
    assert result.metrics["adapted_layers"] == 35 and result.metrics["model_form"] == "lora_linear"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert result.metrics["method_params"] == 5 * 8 * (4 * (64 + 64) - 2 * 32 + 3 * (64 + 172))
    base = load_model(None).model
    reloaded = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    torch.testing.assert_close(_logits(reloaded, ids), tuned, rtol=0, atol=1e-5)
    # After the stage the model holds LoraLinear (no peft); its round trip: tests/test_contract.py.
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 35
    assert not hasattr(model, "peft_config")


def test_merge_gives_plain_linears_with_unchanged_outputs():
    model, ids = tiny_llama(), example_input_ids()
    peft_model = _peft_lora.inject_lora(model, ["q_proj", "up_proj"], rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for param in _peft_lora.lora_params(model).values():
            param.normal_(std=0.2)
    adapted = _logits(model, ids)
    assert _peft_lora.finish_peft(model, peft_model, merge=True) == "merged"
    assert not _peft_lora.peft_layers(model) and all(
        type(m) is torch.nn.Linear
        for n, m in model.named_modules()
        if n.endswith(("q_proj", "up_proj"))
    )
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_lora_linear_merge_matches_the_adapter():
    model, ids = tiny_llama(), example_input_ids()
    peft_model = _peft_lora.inject_lora(model, ["k_proj"], rank=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for param in _peft_lora.lora_params(model).values():
            param.normal_(std=0.3)
    adapted = _logits(model, ids)
    assert _peft_lora.finish_peft(model, peft_model, merge=False) == "lora_linear"
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=1e-6)
    assert merge_compressed(model) == 2
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_compressed_targets_are_refused():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    replace_module(
        model,
        "model.layers.0.self_attn.q_proj",
        LowRankLinear.from_factors(q.weight[:, :4].clone(), torch.eye(4, q.in_features)),
    )
    with pytest.raises(ConfigError, match="already a compressed LowRankLinear.*heal"):
        lora.apply(model, LoraConfig(targets=("q_proj",)), None)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"r": 0}, "`r` must be an integer >= 1"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\)"),
        ({"alpha": -1.0}, "`alpha` must be > 0"),
    ],
)
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**fields)

"""Adapters over a bitsandbytes 4-bit base (QLoRA-style `load_in: 4bit`). bitsandbytes >= 0.45
quantizes and runs NF4 on the CPU too, so the layers are exercised here without a GPU; the
pipeline's own `load_in` path (which needs CUDA) is the lead's models.load_model."""

import pytest
import torch

from compressor.adapters import _peft_lora, dsee, nola
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.targeting import replace_module, select_linears
from compressor.testing.tiny import example_input_ids, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def quantized_tiny_llama(targets=("q_proj", "v_proj")):
    model = tiny_llama()
    for name in select_linears(model, targets):
        linear = model.get_submodule(name)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, quant_type="nf4"
        )
        replace_module(model, name, quantized.to("cpu"))  # .to() quantizes
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_nola_wraps_a_4bit_base_unchanged_and_trains_coefficients():
    model, ids = quantized_tiny_llama(), example_input_ids()
    before = _logits(model, ids)
    layers = nola.install_nola(
        model,
        nola.NolaConfig(targets=("q_proj", "v_proj"), r=4, num_basis_a=8, num_basis_b=8),
        base_seed=0,
    )
    assert all(layer.base_layer is not None and layer.weight is None for layer in layers.values())
    assert torch.equal(_logits(model, ids), before)
    model(ids, labels=ids).loss.backward()
    assert all(layer.nola_coef_b.grad.abs().sum() > 0 for layer in layers.values())
    # Merging dequantizes: the plain Linear reproduces the 4-bit layer's outputs (bias included).
    layer = next(iter(layers.values()))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-4, atol=1e-5)


def test_lora_keeps_peft_layers_over_a_4bit_base():
    model, ids = quantized_tiny_llama(), example_input_ids()
    before = _logits(model, ids)
    peft_model = _peft_lora.inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.0)
    assert torch.equal(_logits(model, ids), before)
    assert _peft_lora.finish_peft(model, peft_model, merge=False) == "peft"


def test_dsee_refuses_a_quantized_base_with_the_fix():
    with pytest.raises(ConfigError, match="bitsandbytes-quantized .* drop `load_in`"):
        dsee.install_dsee(quantized_tiny_llama(), dsee.DseeConfig(), Context(quiet=True), seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_load_in_without_cuda_is_a_one_line_error_naming_the_fix():
    from compressor.errors import ModelError
    from compressor.pipeline import Pipeline

    pipeline = Pipeline.from_recipe({"load_in": "4bit", "stages": [{"method": "lora", "steps": 1}]})
    with pytest.raises(ModelError, match="needs a CUDA GPU.*drop `--load-in`") as error:
        pipeline.run(quiet=True)
    assert "\n" not in str(error.value)

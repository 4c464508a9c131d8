"""Quantized input embedding (`embedding_bits` of rtn / gptq): packed codes that a lookup
dequantizes row by row, a tied lm_head computing with the same codes (one tensor on disk, the
checkpoint still tied), reloads by compressor.load and from_pretrained with equal logits, the
layer-table checks, heal leaving the codes alone, and the refusals (bits 5, a group that does not
divide the hidden size, quantizing twice, compressed-tensors export)."""

from __future__ import annotations

import json

import pytest
import torch
from compressor.cli.main import app
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from compressor.context import Context
from compressor.errors import ConfigError, ModelError
from compressor.kernels.packing import unpack_int
from compressor.layers import QuantEmbedding, QuantLinear, QuantTiedHead
from compressor.methods._quant_grid import Grid, rtn_quantize
from compressor.methods.rtn import RTNConfig
from compressor.methods.rtn import apply as rtn_apply
from compressor.models import load, save
from compressor.testing import tiny_llama
from compressor.testing.tiny import example_input_ids

runner = CliRunner()
IDS = example_input_ids()


def quantized(bits: int = 4, group: int = 16, model: nn.Module | None = None) -> nn.Module:
    model = tiny_llama() if model is None else model
    rtn_apply(model, RTNConfig(bits=4, group_size=16, embedding_bits=bits, embedding_group_size=group),
              Context(quiet=True))
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_codes_pack_exactly_and_a_lookup_gathers_their_dequantized_rows():
    weight = torch.randn(512, 32)
    grid = Grid(4, 16, True, torch.float32)
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(weight)
    quantized(4, 16, model)
    table = model.model.embed_tokens
    codes, scales, _ = rtn_quantize(weight, grid)
    assert torch.equal(unpack_int(table.qweight, 4, 32), codes) and torch.equal(table.scales, scales)
    rows = (codes.float().reshape(512, 2, 16) - 8) * scales.unsqueeze(-1)
    assert torch.equal(table(IDS), rows.reshape(512, 32)[IDS])
    assert table.qweight.dtype == torch.uint8 and table.qweight.shape == (512, 16)  # two codes a byte


def test_a_tied_head_reads_the_same_codes_and_matches_the_dequantized_reference():
    model = quantized(4, 16)
    table, head = model.model.embed_tokens, model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantTiedHead) and head.embedding is table
    assert not list(head.state_dict())  # no copy of its own
    reference = tiny_llama()  # the same model with the dequantized table as a plain tied embedding
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "embed_tokens" not in k}, strict=False)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            reference.get_submodule(name).weight.data = module.dense_weight().detach()
    reference.model.embed_tokens.weight.data.copy_(table.dense_weight().detach())
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_eight_bits_is_within_one_percent_relative_weight_error():
    model = tiny_llama()
    weight = model.model.embed_tokens.weight.detach().clone()
    quantized(8, 32, model)
    error = (model.model.embed_tokens.dense_weight() - weight).norm() / weight.norm()
    assert error < 0.01, float(error)


def test_the_checkpoint_stays_tied_and_both_reloads_give_equal_logits(tmp_path):
    model = quantized(4, 16)
    save(model, tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert stored["model.embed_tokens.qweight"].shape == (512, 16)
    assert stored["lm_head.weight"].numel() == 0 and stored["model.embed_tokens.weight"].numel() == 0
    assert not [k for k in stored if k.startswith("lm_head.") and k != "lm_head.weight"]  # one copy: the embedding's
    assert config["quantization_config"]["layers"]["lm_head"]["type"] == "quant_tied_head"
    want = logits(model)
    ours = load(tmp_path / "q")
    assert torch.equal(logits(ours), want) and ours.lm_head.embedding is ours.model.embed_tokens
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(hf), want)
    assert hf.model.embed_tokens.qweight.dtype == torch.uint8 and isinstance(hf.lm_head, QuantTiedHead)


def test_an_untied_head_is_quantized_as_a_linear_on_the_embedding_grid(tmp_path):
    config = tiny_llama().config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = quantized(8, 16, LlamaForCausalLM(config).eval())
    head = model.lm_head
    assert isinstance(head, QuantLinear) and (head.bits, head.group_size) == (8, 16)
    save(model, tmp_path / "q")
    assert torch.equal(logits(load(tmp_path / "q")), logits(model))


@pytest.mark.parametrize("tensor, shape", [("model.embed_tokens.scales", (512, 3)), ("model.embed_tokens.qweight", None)])
def test_a_damaged_table_tensor_is_named_in_one_line(tmp_path, tensor, shape):
    save(quantized(4, 16), tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    stored = load_file(path)
    if shape is None:
        del stored[tensor]
    else:
        stored[tensor] = torch.ones(shape)
    save_file(stored, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"tensor `{tensor}` (is missing|has shape)") as err:
        load(tmp_path / "q")
    assert "\n" not in str(err.value)


def test_bad_input_is_one_line_and_changes_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"rtn: `embedding_bits` must be 0 .* or one of 2, 3, 4, 8, got 5"):
        RTNConfig(embedding_bits=5)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="`embedding_group_size`=24 does not divide the embedding dim 32"):
        rtn_apply(model, RTNConfig(group_size=16, embedding_bits=4, embedding_group_size=24), Context(quiet=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the linears too
    for flags, fragment in ((["--set", "embedding_bits=5"], "`embedding_bits` must be 0"),
                            (["--group-size", "0", "--set", "embedding_bits=4", "--set", "embedding_group_size=24"], "does not divide the embedding")):
        out = tmp_path / "out"
        result = runner.invoke(app, ["compress", "--method", "rtn", *flags, "--out", str(out), "-q"])
        text = result.output.strip()
        assert result.exit_code != 0 and text.startswith("error:") and fragment in text and "\n" not in text, text
        assert not out.exists()


def test_quantizing_the_embedding_twice_is_refused():
    model = tiny_llama()
    first, second = ("model.layers.0.mlp.down_proj",), ("model.layers.1.mlp.down_proj",)
    rtn_apply(model, RTNConfig(group_size=16, embedding_bits=4, targets=first), Context(quiet=True))
    codes = model.model.embed_tokens.qweight.clone()
    with pytest.raises(ConfigError, match="the input embedding is already quantized \\(4 bits\\); quantize it once"):
        rtn_apply(model, RTNConfig(group_size=16, embedding_bits=8, targets=second), Context(quiet=True))
    assert torch.equal(model.model.embed_tokens.qweight, codes)
    assert not isinstance(model.get_submodule(second[0]), QuantLinear)


def test_compressed_tensors_export_is_refused_in_one_line(tmp_path):
    save(quantized(4, 16), tmp_path / "q")
    out = tmp_path / "ct"
    result = runner.invoke(app, ["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(out)])
    text = result.output.strip()
    assert result.exit_code != 0 and "\n" not in text, text
    assert "model.embed_tokens" in text and "without `embedding_bits`" in text
    assert not out.exists()


def test_a_recipe_exporting_a_quantized_embedding_is_refused_before_loading():
    from compressor.export import check_stages

    with pytest.raises(ConfigError, match="quantizes the input embedding .*; drop `embedding_bits`"):
        check_stages("compressed-tensors", [("gptq", {"bits": 4, "embedding_bits": 8})])


def test_heal_after_quantizing_keeps_the_embedding_codes_frozen():
    from compressor.pipeline import Pipeline

    quantize = {"method": "rtn", "bits": 4, "group_size": 0, "embedding_bits": 4, "embedding_group_size": 32}
    heal = {"method": "heal", "steps": 2, "batch_size": 2, "seq_len": 32, "num_eval": 2, "lr": 0.01}
    _, before = Pipeline.from_recipe({"evaluate": False, "stages": [quantize]}).run(quiet=True)
    _, after = Pipeline.from_recipe({"evaluate": False, "stages": [quantize, heal]}).run(quiet=True)
    old, new = before.model.model.embed_tokens, after.model.model.embed_tokens
    assert isinstance(new, QuantEmbedding) and torch.equal(old.qweight, new.qweight)
    assert after.model.lm_head.embedding is new


def test_gptq_of_the_tied_table_lowers_the_head_output_error_below_rtn(tmp_path):
    from compressor.methods.gptq import GPTQConfig
    from compressor.methods.gptq import apply as gptq_apply

    model = tiny_llama()
    config = GPTQConfig(group_size=16, embedding_bits=4, embedding_gptq=True, num_windows=8, seq_len=32, batch_size=4)
    result = gptq_apply(model, config, Context.for_model(model))
    row = next(r for r in result.per_module if r["module"] == "model.embed_tokens")
    assert row["solver"] == "gptq" and row["output_error"] < row["output_error_rtn"], row
    assert isinstance(model.lm_head, QuantTiedHead) and model.lm_head.embedding is model.model.embed_tokens
    save(model, tmp_path / "q")
    assert torch.equal(logits(load(tmp_path / "q")), logits(model))
    with pytest.raises(ConfigError, match="`embedding_gptq` quantizes a tied embedding"):
        gptq_apply(tiny_llama(), GPTQConfig(group_size=16, embedding_gptq=True), Context(quiet=True))

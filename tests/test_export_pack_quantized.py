"""Export of weight-only int4 / int8 checkpoints to compressed-tensors `pack-quantized`: the layout
is compressed-tensors' own packing of the same codes, its decompressor gives the weights
`compressor.load` gives, transformers loads the folder, and what the format cannot hold is refused
with one line, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from compressor.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from compressor.errors import ConfigError, ModelError
from compressor.export import check_stages, export
from compressor.pipeline import Pipeline
from compressor.kernels.dispatch import pack_int
from compressor.layers import NMSparseLinear, QuantLinear
from compressor.models import load, save
from compressor.targeting import replace_module, select_linears
from compressor.testing import tiny_llama

ct_pack = pytest.importorskip("compressed_tensors.compressors.quantized_compressors.pack_quantized",
                              reason="needs compressed-tensors (pip install --no-deps compressed-tensors==0.14.0 loguru)")


def rtn_layer(weight: torch.Tensor, bits: int, group: int, symmetric: bool, **layer) -> QuantLinear:
    """Round-to-nearest codes of `weight` on the shared grid (a fixture, not the method under test)."""
    out_f, in_f = weight.shape
    groups = weight.reshape(out_f, in_f // group, group)
    if symmetric:
        scales = groups.abs().amax(-1) / 2 ** (bits - 1)
        half = 2 ** (bits - 1)
        codes = (groups / scales[..., None]).round().clamp(-half, half - 1) + half
        zeros = None
    else:
        low, high = groups.amin(-1), groups.amax(-1)
        scales = (high - low) / (2**bits - 1)
        zeros = (-low / scales).round().clamp(0, 2**bits - 1)
        codes = ((groups / scales[..., None]).round() + zeros[..., None]).clamp(0, 2**bits - 1)
        zeros = zeros.to(torch.uint8)
    codes = codes.reshape(out_f, in_f).to(torch.uint8)
    return QuantLinear.from_codes(pack_int(codes, bits), scales, zeros, bits, group, in_f, **layer)


def quantized_checkpoint(folder, bits=4, group=16, symmetric=True, **layer):
    """tiny_llama (float32) with every block linear quantized, saved by compressor."""
    model = tiny_llama(layers=2)
    for name, linear in select_linears(model, (), ()).items():
        group_size = linear.in_features if group is None else group
        replace_module(model, name, rtn_layer(linear.weight.detach(), bits, group_size, symmetric, **layer))
    save(model, folder)
    return folder


def dense_weights(folder) -> dict[str, torch.Tensor]:
    model = load(folder)
    return {name: module.dense_weight().detach() for name, module in model.named_modules()
            if isinstance(module, QuantLinear)}


def scheme_of(config: dict) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(config["quantization_config"])
    return {target: group for group in parsed.config_groups.values() for target in group.targets}


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, True), (8, None, True), (4, 16, False), (8, 16, False)])
def test_layout_is_compressed_tensors_own_int32_packing_of_the_codes(tmp_path, bits, group, symmetric):
    ckpt = quantized_checkpoint(tmp_path / "q", bits, group, symmetric)
    out = export(ckpt, "compressed-tensors", tmp_path / "ct")
    state, source = load_file(out / "model.safetensors"), load(ckpt)
    layers = {n: m for n, m in source.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        q = (layer.quantized_weight() / layer.scales.repeat_interleave(layer.group_size, 1)).round()
        if not symmetric:  # compressed-tensors' signed codes: c - 2^(b-1), with c = q + z
            q = q + layer.zeros.float().repeat_interleave(layer.group_size, 1) - 2 ** (bits - 1)
        expected = ct_pack.pack_to_int32(q.to(torch.int8), bits)
        assert torch.equal(state[f"{name}.weight_packed"], expected), name
        assert state[f"{name}.weight_shape"].tolist() == [layer.out_features, layer.in_features]
        assert torch.equal(state[f"{name}.weight_scale"], layer.scales.detach())
        assert f"{name}.weight" not in state and f"{name}.qweight" not in state
        if symmetric:
            assert f"{name}.weight_zero_point" not in state
        else:
            signed_zeros = (layer.zeros.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
            packed_zeros = ct_pack.pack_to_int32(signed_zeros, bits, packed_dim=0)
            assert torch.equal(state[f"{name}.weight_zero_point"], packed_zeros)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed")
    (only,) = config["config_groups"].values()
    assert sorted(only["targets"]) == sorted(layers)
    assert only["weights"]["strategy"] == ("channel" if group is None else "group")
    assert (only["weights"]["num_bits"], only["weights"]["group_size"], only["weights"]["symmetric"]) == (
        bits, group, symmetric)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, True), (8, None, True), (4, 32, False)])
def test_compressed_tensors_decompresses_the_same_weights_as_compressor_load(tmp_path, bits, group, symmetric):
    ckpt = quantized_checkpoint(tmp_path / "q", bits, group, symmetric)
    out = export(ckpt, "compressed-tensors", tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())
    decompressor = ct_pack.PackedQuantizationCompressor(config=None)
    decompressed = {name: data["weight"] for name, data in decompressor.decompress(str(out), scheme_of(config))}
    expected = dense_weights(ckpt)
    assert set(decompressed) == set(expected)
    for name, weight in expected.items():
        assert torch.equal(decompressed[name], weight), name
    original, exported = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(exported["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_layers_at_different_bits_get_their_own_config_group(tmp_path):
    model = tiny_llama(layers=1)
    for name, linear in select_linears(model, (), ()).items():
        bits = 8 if "mlp" in name else 4
        replace_module(model, name, rtn_layer(linear.weight.detach(), bits, 16, True))
    out = export(save(model, tmp_path / "q"), "compressed-tensors", tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in groups.values()}
    assert by_bits == {4: [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"],
                       8: [f"model.layers.0.mlp.{p}_proj" for p in ("down", "gate", "up")]}


def _new_compressed_tensors() -> dict[str, str] | None:
    """Environment for a python that imports compressed-tensors >= 0.15 (what transformers 5 needs):
    the installed one, or the folder COMPRESSOR_CT_SITE names (pip install --target DIR --no-deps
    compressed-tensors); None if neither."""
    import compressed_tensors
    from packaging.version import Version

    if Version(compressed_tensors.__version__) >= Version("0.15"):
        return dict(os.environ)
    site = os.environ.get("COMPRESSOR_CT_SITE")
    if site and os.path.isdir(os.path.join(site, "compressed_tensors")):
        return {**os.environ, "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])}
    return None


TRANSFORMERS_LOAD = textwrap.dedent("""
    import sys, torch, transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    folder, ids = sys.argv[1], torch.arange(1, 17)[None]
    packed = AutoModelForCausalLM.from_pretrained(folder)  # kept packed, decompressed on first forward
    dequantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.save({"packed": packed(ids).logits, "dequantized": dequantized(ids).logits}, sys.argv[2])
""")


@pytest.mark.slow
@pytest.mark.parametrize("bits,group", [(4, 16), (8, None)])
def test_transformers_loads_the_export_with_the_logits_of_compressor_load(tmp_path, bits, group):
    env = _new_compressed_tensors()
    if env is None:  # transformers 5 refuses compressed-tensors < 0.15, and 0.14 is the sparse-24 reader
        pytest.skip("transformers needs compressed-tensors>=0.15: set COMPRESSOR_CT_SITE to a folder holding it")
    ckpt = quantized_checkpoint(tmp_path / "q", bits, group, True)
    out = export(ckpt, "compressed-tensors", tmp_path / "ct")
    script = tmp_path / "load.py"
    script.write_text(TRANSFORMERS_LOAD)
    done = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "logits.pt")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        expected = load(ckpt)(torch.arange(1, 17)[None]).logits
    for how, got in logits.items():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=how)


def _one_line_refusal(tmp_path, ckpt, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        export(ckpt, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    result = CliRunner().invoke(app, ["export", str(ckpt), "--format", "compressed-tensors", "--out",
                                      str(tmp_path / "ct2")])
    assert result.exit_code != 0 and result.output.strip().count("\n") == 0, result.output
    assert not (tmp_path / "ct2").exists()


def test_three_bit_codes_are_refused_nothing_written(tmp_path):
    ckpt = quantized_checkpoint(tmp_path / "q", bits=3, group=16)
    _one_line_refusal(tmp_path, ckpt, "is 3-bit: .*4- and 8-bit codes only; quantize with --bits 4")


def test_a_low_rank_correction_is_refused_nothing_written(tmp_path):
    model = tiny_llama(layers=1)
    for name, linear in select_linears(model, (), ()).items():
        correction = (torch.randn(linear.out_features, 2), torch.randn(2, linear.in_features))
        replace_module(model, name, rtn_layer(linear.weight.detach(), 4, 16, True, correction=correction))
    ckpt = save(model, tmp_path / "q")
    _one_line_refusal(tmp_path, ckpt, "rank-2 low-rank correction U V .* without `correction_rank`")


def test_mixing_2_4_and_quantized_layers_is_refused_nothing_written(tmp_path):
    model = tiny_llama(layers=1)
    for name, linear in select_linears(model, (), ()).items():
        weight = linear.weight.detach()
        if "mlp" in name:
            keep = weight.abs().reshape(-1, 4).topk(2, dim=-1).indices
            mask = torch.zeros(weight.numel() // 4, 4).scatter_(1, keep, 1).reshape(weight.shape)
            replace_module(model, name, NMSparseLinear.from_dense(weight * mask, 2, 4))
        else:
            replace_module(model, name, rtn_layer(weight, 4, 16, True))
    _one_line_refusal(tmp_path, save(model, tmp_path / "q"), "mixes 2:4 and quantized layers: .*marlin-24")


def test_bitsandbytes_format_says_why_it_is_not_written(tmp_path):
    ckpt = quantized_checkpoint(tmp_path / "q")
    with pytest.raises(ConfigError, match="'bitsandbytes' is not written: .*nf4 .*non-uniform"):
        export(ckpt, "bitsandbytes", tmp_path / "bnb")
    argv = ["export", str(ckpt), "--format", "bitsandbytes", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "nf4" in result.output and not (tmp_path / "b").exists()



def test_an_rtn_run_exports_beside_its_checkpoint_and_decompresses_to_its_weights(tmp_path):
    source = tmp_path / "src"
    tiny_llama(layers=1).save_pretrained(source)
    recipe = {"model": str(source), "out": str(tmp_path / "run"), "evaluate": False,
              "stages": [{"method": "rtn", "bits": 4, "group_size": 16}], "export": "compressed-tensors"}
    Pipeline.from_recipe(recipe).run(quiet=True)
    out = tmp_path / "run" / "compressed-tensors"
    config = json.loads((out / "config.json").read_text())
    decompressor = ct_pack.PackedQuantizationCompressor(config=None)
    decompressed = {name: data["weight"] for name, data in decompressor.decompress(str(out), scheme_of(config))}
    expected = dense_weights(tmp_path / "run")
    assert len(expected) == 7 and set(decompressed) == set(expected)
    for name, weight in expected.items():
        assert torch.equal(decompressed[name], weight), name


def test_recipe_export_is_checked_against_the_quantize_stages_before_loading():
    check_stages("compressed-tensors", [("rtn", {"bits": 8}), ("gptq", {"bits": 4, "correction_rank": 0})])
    with pytest.raises(ConfigError, match="output of `gptq`: its layer is 3-bit"):
        Pipeline.from_recipe({"stages": [{"method": "gptq", "bits": 3}], "export": "compressed-tensors"})
    with pytest.raises(ConfigError, match="output of `gptq`: its layer carries a rank-4 low-rank correction"):
        Pipeline.from_recipe({"stages": [{"method": "gptq", "correction_rank": 4}], "export": "compressed-tensors"})
    with pytest.raises(ConfigError, match="cannot hold 2:4 and quantized layers together"):
        Pipeline.from_recipe({"stages": [{"method": "prune", "pattern": "2:4"}, {"method": "rtn"}],
                              "export": "compressed-tensors"})
    with pytest.raises(ConfigError, match="output of `svd`"):
        Pipeline.from_recipe({"stages": [{"method": "svd"}, {"method": "rtn"}], "export": "compressed-tensors"})


def test_a_2_4_model_with_quantized_values_is_refused_as_marlin_24(tmp_path):
    source = tmp_path / "src"
    tiny_llama(layers=1).save_pretrained(source)
    recipe = {"model": str(source), "out": str(tmp_path / "run"), "evaluate": False,
              "stages": [{"method": "prune", "pattern": "2:4"}, {"method": "rtn", "group_size": 8}]}
    Pipeline.from_recipe(recipe).run(quiet=True)
    _one_line_refusal(tmp_path, tmp_path / "run", "nm_sparse_quant: .*marlin-24 layout, which vLLM dropped")

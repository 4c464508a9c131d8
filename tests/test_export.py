"""Export to compressed-tensors: a 2:4 prune checkpoint round-trips through compressed-tensors'
own sparse-24-bitmask reader; a low-rank checkpoint is refused with the reason, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compressor.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from compressor.errors import ConfigError, ModelError
from compressor.export import export
from compressor.models import load, read_manifest
from compressor.pipeline import Pipeline
from compressor.testing import tiny_llama


def _run(tmp_path, name, stage, **top):
    source = tmp_path / "src"
    if not source.exists():
        tiny_llama(layers=2).save_pretrained(source)
    recipe = {"model": str(source), "out": str(tmp_path / name), "evaluate": False, "stages": [stage], **top}
    Pipeline.from_recipe(recipe).run(quiet=True)
    return tmp_path / name


def _dense_weights(folder):
    model = load(folder)
    return {f"{n}.weight": m.dense_weight().detach() for n, m in model.named_modules() if hasattr(m, "dense_weight")}


def test_sparse24_layout_is_values_row_major_and_little_endian_bits(tmp_path):
    ckpt = _run(tmp_path, "pruned", {"method": "prune", "pattern": "2:4"})
    out = export(ckpt, "compressed-tensors", tmp_path / "ct")
    state = load_file(out / "model.safetensors")
    for name, dense in _dense_weights(ckpt).items():
        prefix = name.removesuffix(".weight")
        packed = state[f"{prefix}.bitmask"].numpy()  # numpy's little-endian unpacking, as compressed-tensors
        mask = torch.from_numpy(np.unpackbits(packed, axis=-1, count=dense.shape[1], bitorder="little")).bool()
        assert (mask.reshape(-1, 4).sum(1) == 2).all()  # exactly 2 of every 4
        rebuilt = torch.zeros_like(dense)
        rebuilt[mask] = state[f"{prefix}.compressed"].flatten()
        assert torch.equal(rebuilt, dense)
        assert state[f"{prefix}.shape"].flatten().tolist() == list(dense.shape)
        assert f"{prefix}.weight" not in state
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert set(config["sparsity_config"]["targets"]) == set(read_manifest(ckpt)["layers"])


def test_compressed_tensors_decompresses_the_export_to_the_same_weights(tmp_path):
    # compressed-tensors dropped its sparse formats after 0.14; CI installs 0.14.0 (--no-deps).
    sparse = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask",
                                 reason="needs compressed-tensors<=0.14 (pip install --no-deps compressed-tensors==0.14.0 loguru)")
    from compressed_tensors.config import Sparse24BitMaskConfig

    ckpt = _run(tmp_path, "pruned", {"method": "prune", "pattern": "2:4"})
    out = _run(tmp_path, "pruned-recipe", {"method": "prune", "pattern": "2:4"}, export="compressed-tensors")
    compressor_ = sparse.Sparse24BitMaskCompressor(config=Sparse24BitMaskConfig())
    decompressed = dict(compressor_.decompress(str(out / "compressed-tensors")))
    dense = _dense_weights(ckpt)
    assert dense and set(dense) <= set(decompressed)
    for name, weight in dense.items():
        assert torch.equal(decompressed[name], weight), name
    original = load_file(ckpt / "model.safetensors")
    assert torch.equal(decompressed["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_low_rank_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    ckpt = _run(tmp_path, "lowrank", {"method": "svd", "rank": 0.6})
    with pytest.raises(ModelError, match="low-rank family .* cannot|cannot be exported to compressed-tensors"):
        export(ckpt, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    result = CliRunner().invoke(app, ["export", str(ckpt), "--format", "compressed-tensors", "--out",
                                      str(tmp_path / "ct2")])
    assert result.exit_code != 0 and "one weight tensor per linear" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "ct2").exists()
    with pytest.raises(ConfigError, match="cannot hold the output of `svd`"):
        Pipeline.from_recipe({"stages": [{"method": "svd"}], "export": "compressed-tensors"})
    with pytest.raises(ConfigError, match="export format 'gguf' is unknown"):
        Pipeline.from_recipe({"stages": [{"method": "prune"}], "export": "gguf"})

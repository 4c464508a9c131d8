"""Compressed checkpoints as standard Hugging Face folders: written in the source dtype, loaded by
transformers' from_pretrained once compressor is imported (same logits as compressor.load), refused
by plain transformers, validated before anything is allocated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressor.cli.main import app
from safetensors import safe_open
from typer.testing import CliRunner

from compressor.errors import ConfigError, ModelError
from compressor.models import default_tokenizer, load, read_manifest
from compressor.pipeline import Pipeline
from compressor.testing import tiny_llama
from compressor.testing.tiny import example_input_ids

FAST = {"num_windows": 4, "seq_len": 32, "batch_size": 4}
METHODS = {
    "svd-llm": {"method": "svd-llm", "rank": 0.6, **FAST},
    "saes-svd": {"method": "saes-svd", "rank": 0.6, **FAST},
    "welore": {"method": "welore", "rank": 0.6},  # data-free (spectra only)
    "prune": {"method": "prune", "pattern": "2:4"},
    "dsformer": {"method": "dsformer", "keep_bytes": 0.6, "init": "plain", "stf_steps": 0, "eval_windows": 0, **FAST},
}
# The fresh process: from_pretrained after `import compressor` vs compressor.load vs the run's model.
PARITY = """
import sys, torch, compressor, transformers
ids = torch.load(sys.argv[1])
for folder in sys.argv[2:]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    ours = compressor.load(folder, dtype=str(hf.dtype).removeprefix("torch."))
    want = torch.load(folder + "/expected.pt")
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids).logits
    assert torch.equal(a, b), (folder, (a - b).abs().max())
    assert torch.allclose(a.float(), want, atol=1e-5), (folder, (a.float() - want).abs().max())
    print("OK", folder, type(hf).__name__, hf.dtype)
"""
PLAIN = """
import sys, transformers
try:
    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as err:
    print("REFUSED", type(err).__name__, "compressor" in sys.modules)
else:
    print("LOADED")
"""


def _python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _model_dir(folder: Path, dtype: str = "float32") -> Path:
    model = tiny_llama(layers=2)
    model.config.dtype = dtype
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = dtype  # what the source declares; its weights stay float32 here
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _compress(source: Path | None, out: Path, stage: dict, **top) -> tuple:
    recipe = {"model": str(source) if source else None, "out": str(out), "evaluate": False,
              "stages": [stage], **top}
    report, loaded = Pipeline.from_recipe({k: v for k, v in recipe.items() if v is not None}).run(quiet=True)
    with torch.no_grad():
        torch.save(loaded.model(example_input_ids(1, 16)).logits.float(), out / "expected.pt")
    return report, loaded


def _stored_dtypes(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    return _model_dir(tmp_path_factory.mktemp("tiny-src"))


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for name, stage in METHODS.items():
        _compress(tiny_source, root / name, stage)
    return {name: root / name for name in METHODS}


def test_checkpoint_is_a_hf_folder_with_a_versioned_layer_table(tiny_checkpoints):
    folder = tiny_checkpoints["svd-llm"]
    config = json.loads((folder / "config.json").read_text())
    table = config["quantization_config"]
    assert table["quant_method"] == "compressor" and table["format_version"] == 2
    assert {spec["type"] for spec in table["layers"].values()} == {"low_rank"}
    assert not (folder / "compression.json").exists()
    assert read_manifest(folder) == table
    kinds = {name: {s["type"] for s in read_manifest(f)["layers"].values()} for name, f in tiny_checkpoints.items()}
    assert kinds["prune"] == {"nm_sparse"} and kinds["dsformer"] == {"dense_sparse"}


@pytest.mark.slow
def test_from_pretrained_after_import_compressor_matches_compressor_load(tiny_checkpoints, tmp_path):
    torch.save(example_input_ids(1, 16), tmp_path / "ids.pt")
    out = _python(PARITY, str(tmp_path / "ids.pt"), *map(str, tiny_checkpoints.values()))
    assert out.count("OK") == len(METHODS), out


@pytest.mark.slow
def test_plain_transformers_refuses_a_compressed_folder(tiny_checkpoints):
    for name in ("saes-svd", "prune", "dsformer"):
        assert "REFUSED RuntimeError False" in _python(PLAIN, str(tiny_checkpoints[name])), name


def test_device_map_auto_and_memory_stays_compressed(tiny_checkpoints):
    import transformers

    from compressor.layers import LowRankLinear

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["saes-svd"], device_map="auto")
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(m.u.device.type != "meta" for m in layers)
    dense = tiny_llama(layers=2)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def test_newer_format_version_and_bad_table_fail_before_loading(tiny_checkpoints, tmp_path):
    import shutil

    folder = tmp_path / "newer"
    shutil.copytree(tiny_checkpoints["svd-llm"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"format version 99, newer than this compressor reads \(2\); upgrade"):
        load(folder)
    result = CliRunner().invoke(app, ["eval", str(folder), "--eval-windows", "2"])
    assert result.exit_code != 0 and "format version 99" in result.output
    assert result.output.strip().count("\n") == 0  # one line
    config["quantization_config"]["format_version"] = 2
    first = next(iter(config["quantization_config"]["layers"]))
    rank = config["quantization_config"]["layers"][first]["args"]["rank"]
    config["quantization_config"]["layers"][first]["args"]["rank"] = 10_000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="rank 10000 is outside"):
        load(folder)
    config["quantization_config"]["layers"][first]["args"]["rank"] = rank
    config["quantization_config"]["layers"]["model.layers.7.mlp.up_proj"] = {"type": "low_rank", "args": {}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a linear layer"):
        load(folder)


def test_checkpoint_follows_the_source_dtype_and_dtype_overrides(tmp_path):
    source = _model_dir(tmp_path / "bf16-src", dtype="bfloat16")
    stage = METHODS["saes-svd"]
    report, _ = _compress(source, tmp_path / "auto", stage)
    with safe_open(tmp_path / "auto" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in list(f.keys())}
    assert dtypes == {"BF16"}  # factors, embeddings and norms alike
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    size = report.size
    assert size["dtype"] == "bfloat16"
    assert size["after"]["disk_bytes"] == (tmp_path / "auto" / "model.safetensors").stat().st_size
    assert size["before"]["memory_bytes"] == 2 * size["before"]["parameters"]
    assert size["ratio"]["parameters"] == pytest.approx(size["after"]["parameters"] / size["before"]["parameters"])
    assert "## Size (bfloat16)" in (tmp_path / "auto" / "report.md").read_text()
    _compress(source, tmp_path / "f32", stage, dtype="float32")
    with safe_open(tmp_path / "f32" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in list(f.keys())} == {"F32"}


def test_unknown_dtype_is_a_one_line_error_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="`dtype` must be one of"):
        Pipeline.from_recipe({"stages": [{"method": "svd"}], "dtype": "float8"})
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["compress", "--method", "svd", "--dtype", "half-ish", "--out", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "dtype" in result.output
    assert not out.exists()


def test_tied_embeddings_are_stored_once(tiny_checkpoints):
    with safe_open(tiny_checkpoints["svd-llm"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.slow
def test_stories260k_checkpoints_load_natively(tmp_path):
    """The real checkpoint: every acceptance method, from_pretrained == compressor.load."""
    folders = []
    for name, stage in METHODS.items():
        report, _ = _compress(None, tmp_path / name, {**stage, "num_windows": 8, "seq_len": 64}
                              if "num_windows" in stage else stage)
        assert report.size["dtype"] == "float32"  # stories260K declares float32
        folders.append(str(tmp_path / name))
    torch.save(example_input_ids(1, 16), tmp_path / "ids.pt")  # the ids expected.pt was computed on
    out = _python(PARITY, str(tmp_path / "ids.pt"), *folders)
    assert out.count("OK") == len(METHODS), out
    assert "REFUSED RuntimeError False" in _python(PLAIN, folders[0])


def test_format_1_checkpoints_with_compression_json_still_load(tmp_path):
    from compressor.layers import LowRankLinear, layer_manifest
    from compressor.targeting import replace_module

    model = tiny_llama(layers=2)
    name = "model.layers.0.mlp.up_proj"
    weight = model.get_submodule(name).weight.detach()
    replace_module(model, name, LowRankLinear.from_factors(weight[:, :8].clone(), torch.eye(8, 32)))
    model.save_pretrained(tmp_path / "v1")  # what format 1 wrote: a plain config.json ...
    (tmp_path / "v1" / "compression.json").write_text(json.dumps(  # ... and the layer table beside it
        {"format": "compressor", "version": 1, "layers": layer_manifest(model)}))
    ids = example_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "v1")(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_import_compressor_stays_cheap():
    code = ("import sys, compressor\n"
            "heavy = [m for m in ('transformers.quantizers.auto', 'peft', 'compressor.methods') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    assert "HEAVY []" in _python(code)

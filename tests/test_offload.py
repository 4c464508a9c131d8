"""Compressing a model dispatched by accelerate with its weights offloaded to disk.

A `max_memory` far below the model's size makes accelerate put every weight on disk (meta
tensors + loading hooks), which is what a model bigger than the machine looks like. The block
loop must then give exactly the checkpoint it gives on the ordinary in-memory model."""

from __future__ import annotations

import pytest
import torch
from compressor.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from compressor.errors import ConfigError, ModelError
from compressor.models import default_tokenizer, load_model, read_manifest
from compressor.offload import (
    check_offload_ready,
    has_offloaded_weights,
    is_dispatched,
    parse_max_memory,
    standalone_copy,
)
from compressor.pipeline import Pipeline
from compressor.registry import method_info, method_names
from compressor.testing.tiny import example_input_ids, tiny_llama

ALL_ON_DISK = "cpu=20KB"  # the tiny model is ~300 KB: nothing fits, everything is offloaded


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(layers=3).save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    return folder


def _compress(folder, out, stage, **offload):
    recipe = {"model": str(folder), "out": str(out), "evaluate": {"num_windows": 4},
              "stages": [stage], **offload}
    report, loaded = Pipeline.from_recipe(recipe).run(quiet=True)
    return report, loaded


def test_load_with_tiny_budget_offloads_every_block_to_disk(tiny_dir, tmp_path):
    loaded = load_model(tiny_dir, max_memory=ALL_ON_DISK, offload_folder=tmp_path / "off")
    model = loaded.model
    q_proj = model.model.layers[1].self_attn.q_proj
    assert is_dispatched(model)
    assert q_proj.weight.device.type == "meta" and has_offloaded_weights(q_proj)
    reference = tiny_llama(layers=3)
    ids = example_input_ids()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


CALIBRATION = {"num_windows": 4, "seq_len": 32, "batch_size": 2}
# Every compress method, each path through the calibration engine at least once: block loop with
# and without the teacher stream, the aware dense pass, data-free steps, in-place writes (unstructured
# pruning), and layers trained after the engine placed them (dsformer's STF, maestro).
PARITY_STAGES = {
    "svd": [{"rank": 0.4}],
    "asvd": [{"rank": 0.5, **CALIBRATION}],
    "svd-llm": [{"rank": 0.5, "update": True, **CALIBRATION},  # teacher stream copy
                {"rank": 0.5, "allocation": "aware", **CALIBRATION},
                {"rank": 0.5, "allocation": "welore", **CALIBRATION}],
    "saes-svd": [{"rank": 0.5, **CALIBRATION}],
    "welore": [{"rank": 0.5}],
    "prune": [{"score": "wanda", **CALIBRATION},
              {"score": "sparsegpt", "pattern": "unstructured", **CALIBRATION},
              {"score": "magnitude", "pattern": "unstructured"}],
    "dsformer": [{"keep_bytes": 0.8, "stf_steps": 2, "eval_windows": 0, **CALIBRATION}],
    "maestro": [{"init": "whitened", "epochs": 1, "train_windows": 4, "eval_windows": 0, **CALIBRATION}],
    "gptq": [{"bits": 4, "group_size": 16, "correction_rank": 2, **CALIBRATION}],
    "rtn": [{"bits": 3, "group_size": 16, "symmetric": False}],
}


def test_every_compress_method_has_an_offload_parity_case():
    assert set(PARITY_STAGES) == set(method_names("compress"))


def _tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("stage", [{"method": name, **options} for name, cases in PARITY_STAGES.items()
                                   for options in cases], ids=lambda s: "-".join(str(v) for v in s.values())[:40])
def test_offloaded_compression_equals_in_memory_compression(tiny_dir, tmp_path, stage):
    plain_report, _ = _compress(tiny_dir, tmp_path / "plain", stage)
    disk_report, disk = _compress(tiny_dir, tmp_path / "disk", stage, max_memory=ALL_ON_DISK,
                                  offload_folder=str(tmp_path / "off"))
    assert not is_dispatched(disk.model)  # gathered back to CPU for writing
    assert disk_report.stages[0].per_module == plain_report.stages[0].per_module
    plain, offloaded = _tensors(tmp_path / "plain"), _tensors(tmp_path / "disk")
    assert plain and offloaded.keys() == plain.keys()
    for name, tensor in plain.items():
        assert torch.equal(offloaded[name], tensor), name
    assert disk_report.evaluation["after"]["perplexity"] == pytest.approx(
        plain_report.evaluation["after"]["perplexity"], rel=1e-6)


def test_standalone_copy_is_hook_free_and_leaves_the_original_offloaded(tiny_dir, tmp_path):
    model = load_model(tiny_dir, max_memory=ALL_ON_DISK, offload_folder=tmp_path / "off").model
    block = model.model.layers[0]
    copy = standalone_copy(block)
    assert not any(hasattr(m, "_hf_hook") for m in copy.modules())
    assert all(p.device.type == "cpu" for p in copy.parameters())
    assert block.self_attn.q_proj.weight.device.type == "meta"  # still offloaded
    reference = tiny_llama(layers=3).model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(copy.self_attn.q_proj.weight, reference, rtol=0, atol=0)


def test_nan_in_an_offloaded_weight_is_still_found(tmp_path):
    model = tiny_llama(layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    default_tokenizer().save_pretrained(tmp_path / "nan")
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _compress(tmp_path / "nan", tmp_path / "out", {"method": "svd", "rank": 0.5},
                  max_memory=ALL_ON_DISK, offload_folder=str(tmp_path / "off"))
    assert not (tmp_path / "out").exists()


def test_offload_with_a_finetune_stage_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"lora \(finetune\)"):
        _compress(tmp_path / "does-not-exist", tmp_path / "out", {"method": "lora"},
                  offload_folder=str(tmp_path / "off"))


def test_offload_is_allowed_exactly_for_analyze_and_compress_methods():
    infos = {name: method_info(name) for name in method_names()}
    with pytest.raises(ConfigError) as refused:
        check_offload_ready(infos)
    named = {n for n in infos if f"{n} (" in str(refused.value)}
    assert named == {n for n, info in infos.items() if info.kind not in ("analyze", "compress")} != set()
    check_offload_ready({n: info for n, info in infos.items() if info.kind in ("analyze", "compress")})


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB, cpu=60GiB") == {0: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("cuda:1=10GiB") == {1: "10GiB"}
    for bad in ("20GiB", "gpu=1GiB", ""):
        with pytest.raises(ConfigError, match="max_memory"):
            parse_max_memory(bad)


@pytest.mark.slow
def test_cli_compress_with_offload_flags(tiny_dir, tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, [
        "compress", str(tiny_dir), "--method", "svd-llm", "--rank", "0.5", "--calib-windows", "8",
        "--max-memory", ALL_ON_DISK, "--offload-folder", str(tmp_path / "off"), "--out", str(out),
        "--eval-windows", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and read_manifest(out)["layers"]
    reloaded = load_model(out).model
    assert reloaded(example_input_ids()).logits.isfinite().all()


def test_a_layer_offloaded_like_its_source_loads_on_forward_and_gathers_back():
    """The GPU path of `place_like` (factors of an offloaded layer stay in CPU RAM), exercised
    with the CPU as the execution device."""
    from compressor.layers import LowRankLinear
    from compressor.offload import gather_to_cpu, offload_to_cpu

    layer = LowRankLinear.from_factors(torch.randn(6, 2), torch.randn(2, 5), torch.randn(6))
    x = torch.randn(3, 5)
    expected = layer(x)
    holder = torch.nn.Sequential(offload_to_cpu(layer, "cpu"))
    assert has_offloaded_weights(layer) and all(p.device.type == "meta" for p in layer.parameters())
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in layer.parameters())  # dropped again after forward
    gather_to_cpu(holder)
    assert not is_dispatched(holder) and all(p.device.type == "cpu" for p in layer.parameters())
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_analyze_reads_offloaded_weights_like_in_memory_ones(tiny_dir, tmp_path):
    stage = {"method": "analyze", "use_cache": False}
    plain, _ = _compress(tiny_dir, tmp_path / "a", stage)
    disk, _ = _compress(tiny_dir, tmp_path / "b", stage, max_memory=ALL_ON_DISK, offload_folder=str(tmp_path / "off"))
    kappa = {r["module"]: r["kappa"] for r in plain.stages[0].per_module}
    assert len(kappa) == 21  # 3 blocks x 7 linears
    assert {r["module"]: r["kappa"] for r in disk.stages[0].per_module} == kappa

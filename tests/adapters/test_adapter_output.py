"""What an adapter run writes: the adapter alone (peft format for LoRA, with the base the user
passed and the task type), in the checkpoint dtype; or, with merge, a plain dense model."""

from __future__ import annotations

import json

import peft
import torch
import transformers
from safetensors import safe_open

from compressor.models import DEFAULT_MODEL_DIR, default_tokenizer
from compressor.pipeline import Pipeline
from compressor.testing import tiny_llama
from compressor.testing.tiny import example_input_ids

STAGE = {"method": "lora", "r": 4, "steps": 2, "num_eval": 2, "seq_len": 32, "batch_size": 2, "lr": 1e-2}


def _source(folder, dtype="float32"):
    tiny_llama(layers=2).save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _run(source, out, **top):
    recipe = {"model": str(source), "out": str(out), "evaluate": False, "stages": [STAGE], **top}
    _, loaded = Pipeline.from_recipe(recipe).run(quiet=True)
    with torch.no_grad():
        return loaded.model(example_input_ids()).logits


def test_lora_adapter_loads_with_peft_without_path_edits(tmp_path):
    source = _source(tmp_path / "src")
    expected = _run(source, tmp_path / "out")
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(source.absolute())
    assert config["task_type"] == "CAUSAL_LM"
    assert not (tmp_path / "out" / "config.json").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    tuned = peft.PeftModel.from_pretrained(base, adapter)
    with torch.no_grad():
        torch.testing.assert_close(tuned(example_input_ids()).logits, expected, rtol=0, atol=1e-5)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)  # resolves the base by itself
    with torch.no_grad():
        torch.testing.assert_close(auto(example_input_ids()).logits, expected, rtol=0, atol=1e-5)


def test_merge_writes_a_plain_model_and_adapters_follow_the_dtype(tmp_path):
    source = _source(tmp_path / "src", dtype="bfloat16")
    expected = _run(source, tmp_path / "merged", merge=True)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(example_input_ids()).logits, expected, rtol=0.05, atol=0.05)
    _run(source, tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_embedded_default_records_the_folder_that_resolves(tmp_path):
    recipe = {"out": str(tmp_path / "out"), "evaluate": False, "stages": [STAGE]}
    Pipeline.from_recipe(recipe).run(quiet=True)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(DEFAULT_MODEL_DIR)

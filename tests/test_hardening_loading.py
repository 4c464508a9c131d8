"""Hardening (issue 22): a checkpoint or model folder whose weights do not match what it declares
is an error naming the tensor or field, before anything runs; never a silent wrong load, never
the catch-all `unexpected <Exception>`. Driven from the CLI on damaged copies of real outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_hardening_outputs import invoke, refused

from compressor.models import DEFAULT_MODEL_DIR

Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """An svd checkpoint and a 2:4 prune checkpoint of the embedded model (written once)."""
    root = tmp_path_factory.mktemp("outputs")
    for method in ("svd", "prune"):
        result = invoke("compress", "--method", method, "--eval-windows", "1", "-q", "--out", root / method)
        assert result.exit_code == 0, result.output
    return root


def copy_of(source: Path, to: Path, *, drop: str | None = None, add: str | None = None,
            shorten: str | None = None, config=None) -> Path:
    shutil.copytree(source, to)
    tensors = load_file(to / "model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = tensors["model.norm.weight"].clone()
    if shorten:
        tensors[shorten] = tensors[shorten][..., :-1].contiguous()
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        data = json.loads((to / "config.json").read_text())
        config(data, data.get("quantization_config", {}).get("layers"))
        (to / "config.json").write_text(json.dumps(data))
    return to


def eval_args(folder: Path) -> list:
    return ["eval", folder, "--eval-windows", "1", "-q"]


# -- missing, unexpected and wrong-shape tensors ---------------------------------------------------


def test_a_compressed_checkpoint_missing_a_factor_names_it(outputs, tmp_path):
    folder = copy_of(outputs / "svd", tmp_path / "c", drop=f"{Q_PROJ}.u")
    refused(eval_args(folder), 1, f"`{Q_PROJ}.u` is missing")


def test_a_plain_model_folder_missing_a_weight_names_it(tmp_path):
    folder = copy_of(DEFAULT_MODEL_DIR, tmp_path / "m", drop=f"{Q_PROJ}.weight")
    refused(eval_args(folder), 1, f"`{Q_PROJ}.weight` is missing")


def test_unexpected_tensors_are_named(outputs, tmp_path):
    refused(eval_args(copy_of(outputs / "svd", tmp_path / "c", add="model.extra.weight")), 1, "`model.extra.weight`",
            "not in the model")
    refused(eval_args(copy_of(DEFAULT_MODEL_DIR, tmp_path / "m", add="model.extra.weight")), 1, "`model.extra.weight`")


def test_a_factor_of_the_wrong_shape_is_named(outputs, tmp_path):
    folder = copy_of(outputs / "svd", tmp_path / "c", shorten=f"{Q_PROJ}.u")
    rank = json.loads((folder / "config.json").read_text())["quantization_config"]["layers"][Q_PROJ]["args"]["rank"]
    refused(eval_args(folder), 1, f"`{Q_PROJ}.u` has shape [64, {rank - 1}]", f"[64, {rank}]")


def test_a_config_vocab_size_other_than_the_weights_is_named(tmp_path):
    folder = copy_of(DEFAULT_MODEL_DIR, tmp_path / "m", config=lambda c, _: c.update(vocab_size=600))
    refused(eval_args(folder), 1, "`model.embed_tokens.weight` has shape [512, 64]", "[600, 64]")


# -- the layer table ------------------------------------------------------------------------------

TAMPERING = {
    "rank below the stored factors": (lambda c, layers: layers[Q_PROJ]["args"].update(rank=4), "the layer table says"),
    "layers as a list": (lambda c, layers: c["quantization_config"].update(layers=list(layers.values())),
                         "must be a mapping of module names, got list"),
    "args as a string": (lambda c, layers: layers[Q_PROJ].update(args="rank=4"), "`args` must be a mapping"),
    "an unknown arg": (lambda c, layers: layers[Q_PROJ]["args"].update(alpha=1), "unknown arg `alpha`"),
    "a negative rank": (lambda c, layers: layers[Q_PROJ]["args"].update(rank=-3), "`rank` must be an integer"),
    "a huge rank": (lambda c, layers: layers[Q_PROJ]["args"].update(rank=10**12), "`rank` must be an integer"),
    "a rank above min(m, n)": (lambda c, layers: layers[Q_PROJ]["args"].update(rank=65), "rank 65 is outside 1..64"),
    "an unknown type": (lambda c, layers: layers[Q_PROJ].update(type="low_rank_v9"), "unknown type 'low_rank_v9'"),
    "quant_method changed": (lambda c, layers: c["quantization_config"].update(quant_method="bitsandbytes"),
                             "`quant_method` is 'bitsandbytes'"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_layer_table_tampering_is_named(outputs, tmp_path, case):
    change, fragment = TAMPERING[case]
    refused(eval_args(copy_of(outputs / "svd", tmp_path / "c", config=change)), 1, fragment, "config.json" if
            "quant_method" in case else "")


def test_an_nm_pattern_with_m_zero_is_named(outputs, tmp_path):
    folder = copy_of(outputs / "prune", tmp_path / "p", config=lambda c, layers: layers[Q_PROJ]["args"].update(m=0))
    refused(eval_args(folder), 1, "pattern 2:0 is not N:M")


def format_one(svd: Path, to: Path, change=None) -> Path:
    """A format-1 folder (compression.json beside a plain config.json, no placeholders) of `svd`."""
    shutil.copytree(svd, to)
    config = json.loads((to / "config.json").read_text())
    table = config.pop("quantization_config")
    if change:
        change(table["layers"])
    (to / "config.json").write_text(json.dumps(config))
    (to / "compression.json").write_text(json.dumps({"layers": table["layers"]}))
    tensors = {k: v for k, v in load_file(to / "model.safetensors").items() if v.numel()}
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return to


def test_format_one_tables_are_validated(outputs, tmp_path):
    good = format_one(outputs / "svd", tmp_path / "good")
    assert invoke(*eval_args(good)).exit_code == 0

    def dotted(layers):
        layers["model..layers.0.self_attn.q_proj"] = layers.pop(Q_PROJ)

    refused(eval_args(format_one(outputs / "svd", tmp_path / "dots", dotted)), 1, "`model..layers.0.self_attn.q_proj`",
            "not a linear layer")
    huge = format_one(outputs / "svd", tmp_path / "huge", lambda layers: layers[Q_PROJ]["args"].update(rank=2**40))
    refused(eval_args(huge), 1, "`rank` must be an integer")
    negative = format_one(outputs / "svd", tmp_path / "neg", lambda layers: layers[Q_PROJ]["args"].update(rank=-1))
    refused(eval_args(negative), 1, "`rank` must be an integer")


# -- other inputs that used to reach the catch-all --------------------------------------------------


def test_a_folder_without_a_tokenizer_says_so(outputs, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(outputs / "svd", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    refused(eval_args(folder), 1, "has no tokenizer", "copy the tokenizer files")


def test_export_of_a_prune_checkpoint_missing_a_tensor_names_it(outputs, tmp_path):
    folder = copy_of(outputs / "prune", tmp_path / "p", drop=f"{Q_PROJ}.values")
    refused(["export", folder, "--out", tmp_path / "ct"], 1, f"`{Q_PROJ}.values` is missing")
    assert not (tmp_path / "ct").exists()


def test_a_non_float_config_dtype_with_dtype_auto_is_named(tmp_path):
    folder = copy_of(DEFAULT_MODEL_DIR, tmp_path / "m", config=lambda c, _: c.update(dtype="int3"))
    refused(["compress", folder, "--method", "svd", "--eval-windows", "1", "-q", "--out", tmp_path / "o"], 2,
            "declares int3", "--dtype float32")
    assert not (tmp_path / "o").exists()


def test_compressing_a_tied_lm_head_is_refused(tmp_path):
    refused(["compress", "--method", "svd", "--targets", "lm_head", "-q", "--out", tmp_path / "o"], 2,
            "`lm_head` shares its weight with the input embeddings", "drop it from --targets")
    assert not (tmp_path / "o").exists()


def test_transformers_from_pretrained_names_a_missing_factor_too(outputs, tmp_path):
    import transformers

    from compressor.errors import ModelError

    folder = copy_of(outputs / "svd", tmp_path / "c", drop=f"{Q_PROJ}.v")
    with pytest.raises(ModelError, match=rf"tensor `{Q_PROJ}\.v` is missing"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)

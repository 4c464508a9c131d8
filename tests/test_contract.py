"""The contract every compress and finetune method keeps, driven by the registry (as peft's
TEST_CASES table): apply with tiny settings to tiny architectures built in code, then

* save -> `compressor.load` gives the same outputs, with the same compressed layers;
* `merge_compressed` (every CompressedLinear -> nn.Linear) gives the same outputs;
* a run that writes an adapter folder: that adapter, loaded onto a fresh copy of the base with
  the loader of its format, gives the same outputs;
* a method with a `merge` option: the same run with `merge: true` gives the same outputs as the
  unmerged run (its adapter folded into plain linears by the method itself).

Every method `compressor.registry.method_names(kind)` lists for "compress" and "finetune" must
have an entry in TINY: a new method fails `test_every_method_has_tiny_settings` until it gets one,
and is then covered by every check below. Only the registry's public API is used (`get_method`,
`apply_`, the config's `from_dict`), so the table survives refactors of the method modules.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import pkgutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import compressor
from compressor.config import CalibrationConfig
from compressor.configs.train import TrainConfig
from compressor.context import Context
from compressor.layers import CompressedLinear, compressed_layers, merge_compressed
from compressor.models import default_tokenizer
from compressor.registry import BUILTIN, apply_, declared_config, get_method, method_names
from compressor.testing.tiny import example_input_ids, tiny_bert, tiny_gpt2, tiny_llama

KINDS = ("compress", "finetune")
ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
CAUSAL = ("llama", "gpt2")  # fine-tuning trains a causal LM; encoders are refused by design
CALIB = {"num_windows": 4, "seq_len": 32, "batch_size": 2}
FIT = {"steps": 2, "batch_size": 2, "seq_len": 32, "num_eval": 2, "lr": 0.05}
ADAPTER_RANK = {"r": 2}  # the integer adapter rank of lora / nola / dsee (peft's name)


@dataclass(frozen=True)
class Case:
    """A method's own tiny settings, the architectures it runs on (None: what its kind allows),
    and a stage run first (methods that train the layers a compression made need a compressed
    model). What follows from the config is not repeated here: see `case_of`."""

    settings: dict = field(default_factory=dict)
    archs: tuple[str, ...] | None = None
    before: tuple[str, dict] | None = None
    tolerance: dict = field(default_factory=lambda: {"rtol": 1e-5, "atol": 1e-5})


TINY: dict[str, Case] = {
    # compress
    "svd": Case({"rank": 0.6}),
    "asvd": Case({"rank": 0.6}),
    "svd-llm": Case({"rank": 0.6}),
    "saes-svd": Case({"rank": 0.6}),
    "welore": Case({"rank": 0.6}),
    "prune": Case({"pattern": "2:4", "score": "wanda"}),
    "gptq": Case({"bits": 4, "group_size": 16, "correction_rank": 2}),
    "rtn": Case({"bits": 3, "group_size": 16, "symmetric": False}),
    # dsformer's STF and maestro's training minimise the LM loss: causal LMs only.
    "dsformer": Case({"keep_bytes": 0.7, "stf_steps": 2, "eval_windows": 0}, CAUSAL),
    "maestro": Case({"rank": 0.5, "epochs": 1, "train_windows": 4, "eval_windows": 0}, CAUSAL),
    # finetune
    "backprop": Case(),
    "mezo": Case({"adapter": "lora", "lora_r": 2}),
    "sorted": Case(),
    "lora": Case({"dropout": 0.0}),
    "nola": Case({"num_basis_a": 8, "num_basis_b": 8}),
    # dsee's default targets are q/v projections by name (GPT-2's fused c_attn is refused with the fix).
    "dsee": Case({"num_sparse": 8, "grebsmo_iterations": 4, "prune": "2:4", "prune_targets": ["re:.*mlp.*"],
                  "retune_steps": 2}, ("llama",)),
    "kappatune": Case({"num_modules": 2, "lora_r": 2, "lora_dropout": 0.0}),
    "heal": Case(before=("svd", {"rank": 0.6})),
    "welore-tune": Case(before=("welore", {"rank": 0.6})),
}


def case_of(name: str) -> Case:
    """TINY[name] completed from the method's config: tiny calibration (CalibrationConfig), tiny
    training (TrainConfig) and adapter rank (a field `r`) settings; fine-tuning runs causal LMs."""
    config_cls = get_method(name).config_cls
    shared = {**(CALIB if issubclass(config_cls, CalibrationConfig) else {}),
              **(FIT if issubclass(config_cls, TrainConfig) else {}),
              **(ADAPTER_RANK if "r" in config_cls.field_names() else {})}
    case = TINY[name]
    archs = case.archs or (CAUSAL if config_cls.method_kind == "finetune" else tuple(ARCHS))
    return dataclasses.replace(case, settings={**shared, **case.settings}, archs=archs)


def outputs(model, ids):
    """The model's main output on `ids`: logits, or a bare encoder's last hidden state."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _run(name: str, settings: dict, model, ctx: Context):
    config = get_method(name).config_cls.from_dict(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny calibration sets warn that they are tiny
        return apply_(model, config, ctx)


def _kinds(model) -> dict[str, str]:
    return {name: layer.layer_type for name, layer in compressed_layers(model).items()}


# -- adapter folders, by the format written in their adapter_config.json ------------------------


def _load_peft(base, folder: Path):
    import peft

    return peft.PeftModel.from_pretrained(base, str(folder)).eval()


def _load_own(method: str):
    def load(base, folder: Path):
        module = importlib.import_module(get_method(method).apply.__module__)
        getattr(module, f"load_{method}_adapter")(base, folder)
        return base

    return load


def adapter_loader(folder: Path):
    """The loader of an adapter folder's format; a format without one fails here, loudly."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if "peft_type" in config:
        return _load_peft
    if config.get("method") in ("nola", "dsee"):
        return _load_own(config["method"])
    raise AssertionError(f"no loader for the adapter format of {folder}: {sorted(config)}; add one here")


# -- the table ----------------------------------------------------------------------------------


def test_every_method_has_tiny_settings():
    methods = {name for kind in KINDS for name in method_names(kind)}
    missing = sorted(methods - set(TINY))
    assert not missing, f"add tiny settings for {missing} to TINY in tests/test_contract.py"
    assert not set(TINY) - methods, f"TINY names methods the registry lacks: {sorted(set(TINY) - methods)}"


def test_every_registering_module_is_in_the_builtin_table():
    """Import every module of the method packages: each method any of them registers is declared
    by a BUILTIN line, so `method_names` (which reads only the config modules) lists every method
    this file covers."""
    for package in ("analysis", "methods", "adapters", "training"):
        root = importlib.import_module(f"compressor.{package}")
        for info in pkgutil.walk_packages(root.__path__, f"{root.__name__}."):
            importlib.import_module(info.name)
    declared = {declared_config(module).method_name for module in BUILTIN}
    assert set(method_names()) == declared  # method_names() = BUILTIN + every registration


def contract_cells():
    for kind in KINDS:
        for name in method_names(kind):
            for arch in case_of(name).archs if name in TINY else ():
                yield pytest.param(name, arch, id=f"{name}-{arch}")


@pytest.mark.parametrize("method, arch", list(contract_cells()))
def test_apply_save_reload_merge(method, arch, tmp_path):
    case = case_of(method)
    model = ARCHS[arch]()
    ctx = Context(tokenizer=default_tokenizer(), quiet=True, out_dir=tmp_path / "run")
    if case.before:
        _run(*case.before, model, ctx)
    base = copy.deepcopy(model)
    ids = example_input_ids()
    before = outputs(model, ids)
    result = _run(method, case.settings, model, ctx)
    expected = outputs(model, ids)
    assert torch.isfinite(expected).all()
    assert not torch.equal(expected, before), f"{method} left {arch}'s outputs unchanged"

    compressor.save(model, tmp_path / "ckpt")
    reloaded = compressor.load(tmp_path / "ckpt")
    assert type(reloaded) is type(model) and _kinds(reloaded) == _kinds(model)
    torch.testing.assert_close(outputs(reloaded, ids), expected, **case.tolerance)

    assert merge_compressed(reloaded) == len(_kinds(model))
    assert not any(isinstance(m, CompressedLinear) for m in reloaded.modules())
    torch.testing.assert_close(outputs(reloaded, ids), expected, rtol=1e-4, atol=1e-4)

    if "adapter_config" in result.artifacts:
        folder = Path(result.artifacts["adapter_config"]).parent
        adapted = adapter_loader(folder)(base, folder)
        torch.testing.assert_close(outputs(adapted, ids), expected, **case.tolerance)


def merge_cells():
    for kind in KINDS:
        for name in method_names(kind):
            fields = {f.name for f in dataclasses.fields(get_method(name).config_cls)}
            if "merge" in fields and name in TINY:
                yield pytest.param(name, id=name)


@pytest.mark.parametrize("method", list(merge_cells()))
def test_merge_option_gives_the_unmerged_outputs(method, tmp_path):
    case = case_of(method)
    ids = example_input_ids()
    results = {}
    for merge in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation and data order in both runs
        model = ARCHS[case.archs[0]]()
        ctx = Context(tokenizer=default_tokenizer(), quiet=True, out_dir=tmp_path / f"run-{merge}")
        if case.before:
            _run(*case.before, model, ctx)
        _run(method, {**case.settings, "merge": merge}, model, ctx)
        results[merge] = outputs(model, ids)
        if merge:
            assert not compressed_layers(model) and not hasattr(model, "peft_config")
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["dsformer", "maestro"])
def test_training_compressors_refuse_an_encoder_in_one_line(method, tmp_path):
    """dsformer's STF and maestro train on the next-token loss: an encoder is refused up front
    (it has no `.logits`), not with an AttributeError mid-run."""
    from compressor.errors import ConfigError

    ctx = Context(tokenizer=default_tokenizer(), quiet=True, out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"^{method}: .* needs a causal LM, and `bert` is not one"):
        _run(method, case_of(method).settings, tiny_bert(), ctx)

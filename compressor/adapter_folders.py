"""MODEL given as an adapter folder: load the base model it names, apply the adapter, merge it.

An unmerged LoRA (peft format), NOLA or DSEE run writes only `OUT/adapter/` (adapter_config.json
+ weights, `base_model_name_or_path` = the model the run was given). Wherever a model is read
(`eval`, `generate`, `compress`, `finetune`, `compressor.load`), that folder or the run folder
OUT holding it loads as base + adapter with the adapter merged into plain linears: the outputs
are the adapted model's, and every later stage sees an ordinary model. A base that is itself an
adapter folder (fine-tuning an adapted model again) resolves the same way.

`compressor.models` reaches this module by name (importlib): it imports the adapter modules,
which import `compressor.models`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelError
from .models import LoadedModel
from .targeting import replace_module

ADAPTER_CONFIG = "adapter_config.json"
# adapter_config.json `method` -> the module whose loader installs it (peft's files name no method).
LOADERS = {"nola": ("compressor.adapters.nola", "load_nola_adapter"),
           "dsee": ("compressor.adapters.dsee", "load_dsee_adapter")}


def find_adapter(path: Path) -> Path | None:
    """The adapter folder `path` is, or the `adapter/` folder of the run folder `path` is."""
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def adapter_kind(config: dict[str, Any]) -> str:
    """`lora` (a peft LoRA adapter), `nola` or `dsee`; ModelError for anything else."""
    if config.get("peft_type") == "LORA":
        return "lora"
    if config.get("method") in LOADERS:
        return config["method"]
    kind = config.get("peft_type") or config.get("method") or "unknown"
    raise ModelError(f"adapter kind `{kind}` is not one compressor loads (peft LoRA, NOLA, DSEE); load it "
                     "with the library that wrote it")


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"`{folder / ADAPTER_CONFIG}` is unreadable ({err}); re-run the fine-tuning that "
                         "wrote it") from None


def load_adapter_folder(folder: Path, load_base: Callable[[str], LoadedModel]) -> LoadedModel:
    """Base model (through `load_base`, which loads any MODEL) + the adapter in `folder`, merged."""
    config = read_config(folder)
    kind = adapter_kind(config)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"adapter `{folder}` names no base model (`base_model_name_or_path`); load the base "
                         "yourself and apply it with its loader (see the README's Adapters section)")
    if Path(base).expanduser().resolve() == folder.resolve():
        raise ModelError(f"adapter `{folder}` names itself as its base model; fix `base_model_name_or_path`")
    try:
        loaded = load_base(base)
    except ModelError as err:
        raise ModelError(f"adapter `{folder}` needs its base model `{base}`, which did not load: {err}") from None
    loaded.model = merged_adapter(loaded.model, folder, kind)
    loaded.source = str(folder)
    loaded.manifest = None
    return loaded


def merged_adapter(model: nn.Module, folder: Path, kind: str) -> nn.Module:
    """`model` with the adapter in `folder` applied and merged into its linears."""
    if kind == "lora":
        import peft

        return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    module, function = LOADERS[kind]
    layers = getattr(importlib.import_module(module), function)(model, folder)
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear())
    return model

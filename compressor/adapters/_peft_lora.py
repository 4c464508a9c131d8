"""LoRA through Hugging Face peft, the maths and plumbing the `lora` stage is made of: field checks,
injection, training through `fit`, and writing the adapter in peft's format. Registers no method,
so KappaTune and MeZO-LoRA train peft adapters without registering `lora`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
from torch import nn

from ..configs.lora import check_lora_fields  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..layers import LoraLinear
from ..models import is_causal_config
from ..report.records import StageResult
from ..targeting import replace_module
from ..training import TrainConfig, fit
from ._common import (
    adapter_folder,
    base_model_reference,
    count_params,
    finish,
    is_quantized,
    param_metrics,
)

# -- wiring (shared with kappatune's LoRA mode and MeZO's adapter mode) ------------------------


def inject_lora(model: nn.Module, names: list[str], *, rank: int, alpha: float,
                dropout: float) -> peft.PeftModel:
    """peft LoRA on exactly the modules `names` (full names), in place; returns the PeftModel."""
    from ..layers.base import linear_shape

    wanted = set(names)
    for name, module in model.named_modules():  # peft's rule: a target is the full name or a dotted suffix
        if not (name in wanted or any(name.endswith(f".{target}") for target in wanted)):
            continue
        out_f, in_f = linear_shape(module)
        if rank > min(out_f, in_f):  # a rank above min(out, in) adds parameters and no expressiveness
            raise ConfigError(f"LoRA rank r={rank} is larger than `{name}` ({out_f}x{in_f}) can use; pass --r "
                              f"{min(out_f, in_f)} or less (recipes: `r` / `lora_r`)")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=list(names), bias="none")
    return peft.get_peft_model(model, config)


def lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def save_peft_adapter(peft_model: peft.PeftModel, folder: Path, base: str | None = None,
                      causal: bool = True) -> dict[str, str]:
    """peft's own format: adapter_model.safetensors + adapter_config.json (+ its README), with
    `base_model_name_or_path` = `base` (what the user passed) and `task_type` set, so
    `PeftModel.from_pretrained(base_model, folder)` and peft's AutoPeftModel* load it as is."""
    peft_model.save_pretrained(str(folder))
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["task_type"] = "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"
    if base is not None:
        config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return {"adapter": str(folder / "adapter_model.safetensors"),
            "adapter_config": str(folder / "adapter_config.json")}


def finish_peft(model: nn.Module, peft_model: peft.PeftModel, merge: bool) -> str:
    """Leave `model` merged (plain Linear), as LoraLinear layers, or (quantized base) as peft's."""
    layers = peft_layers(model)
    if merge:
        peft_model.merge_and_unload()
        return "merged"
    if any(is_quantized(m.get_base_layer()) for m in layers.values()):
        return "peft"
    for name, layer in layers.items():
        replace_module(model, name, LoraLinear.from_peft(layer))
    if hasattr(model, "peft_config"):
        del model.peft_config  # peft's marker; the model no longer holds peft layers
    return "lora_linear"


def train_lora(model: nn.Module, names: list[str], config: TrainConfig, ctx: Context, *, rank: int,
               alpha: float, dropout: float, merge: bool, method: str,
               **fit_kwargs: Any) -> StageResult:  # fmt: skip
    """Inject, fit, save in peft format, then merge or convert: the shared LoRA stage body.

    `fit_kwargs` (loss_fn, eval_fn, data) go to `compressor.training.fit` unchanged.
    """
    flags = {id(p): p.requires_grad for p in model.parameters()}
    peft_model = inject_lora(model, names, rank=rank, alpha=alpha, dropout=dropout)
    params = lora_params(model)
    result = fit(model, params, config, ctx, method=method, **fit_kwargs)
    folder = adapter_folder(ctx)
    causal = is_causal_config(model.config)
    artifacts = save_peft_adapter(peft_model, folder, base_model_reference(ctx), causal) if folder else {}
    rows = [{"module": n, "rank": rank,
             "trainable": sum(p.numel() for k, p in m.named_parameters() if "lora_" in k)}
            for n, m in peft_layers(model).items()]  # fmt: skip
    form = finish_peft(model, peft_model, merge)
    for param in model.parameters():  # peft froze the whole base: give later stages the flags back
        param.requires_grad_(flags.get(id(param), param.requires_grad))
    metrics = {**param_metrics(model, count_params(params)), "adapted_layers": len(rows),
               "rank": rank, "alpha": alpha, "model_form": form, "merged": merge}
    return finish(result, metrics=metrics, per_module=rows, artifacts=artifacts, modified_model=merge)

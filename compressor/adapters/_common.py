"""Helpers shared by the adapter stages: default learning rates, per-layer seeds, quantized bases,
adapter files, and the trainable-parameter report every adapter returns."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import ConfigError
from ..targeting import linear_weight
from ..training.config import TrainConfig

ADAPTER_DIR = "adapter"


def with_default_lr(config: TrainConfig, *, adamw: float, mezo: float) -> TrainConfig:
    """`config` with `lr` filled in from the method's defaults when the user left it unset.

    The trainer's own defaults (adamw 1e-4, mezo 1e-6) are for full fine-tuning; adapters train
    few parameters and their papers use larger rates (NOLA 1e-3, MeZO-LoRA 5e-5).
    """
    if config.lr is not None:
        return config
    return config.replace(lr=adamw if config.optimizer == "adamw" else mezo)


def layer_seed(base_seed: int, name: str) -> int:
    """A 31-bit seed per layer, stable across runs and machines (crc32 of the module name)."""
    return (zlib.crc32(name.encode()) + 1_000_003 * int(base_seed)) % (2**31)


def run_seed(config: TrainConfig, ctx) -> int:
    return config.seed if config.seed is not None else int(getattr(ctx, "seed", 0) or 0)


# -- quantized (bitsandbytes) bases ------------------------------------------------------------


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes Linear4bit / Linear8bitLt (a base loaded with `load_in`)."""
    weight = getattr(module, "weight", None)
    return hasattr(weight, "quant_state") or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def base_weight(module: nn.Module) -> Tensor:
    """W (out, in) of a base linear as float, dequantizing bitsandbytes weights."""
    weight = getattr(module, "weight", None)
    if hasattr(weight, "quant_state"):
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    state = getattr(module, "state", None)
    if getattr(state, "CB", None) is not None and getattr(state, "SCB", None) is not None:
        import bitsandbytes as bnb

        return bnb.functional.int8_vectorwise_dequant(state.CB, state.SCB).float()
    return linear_weight(module).detach().float()


def refuse_quantized(method: str, modules: dict[str, nn.Module], why: str) -> None:
    """ConfigError naming the quantized layers when a method needs a full-precision base."""
    quantized = [n for n, m in modules.items() if is_quantized(m)]
    if quantized:
        raise ConfigError(
            f"{method}: {len(quantized)} target layer(s) are bitsandbytes-quantized (e.g. {quantized[0]}), "
            f"but {why}; drop `load_in` from the recipe"
        )


# -- files and reports -------------------------------------------------------------------------


def adapter_folder(ctx) -> Path | None:
    """<out>/adapter, or None when the run writes nothing."""
    out = getattr(ctx, "out_dir", None)
    return Path(out) / ADAPTER_DIR if out is not None else None


def write_adapter(folder: Path, tensors: dict[str, Tensor], config: dict[str, Any], filename: str) -> dict[str, str]:
    """safetensors of `tensors` + adapter_config.json; returns the StageResult artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / filename))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return {"adapter": str(folder / filename), "adapter_config": str(folder / "adapter_config.json")}


def count_params(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


def model_params(model: nn.Module) -> int:
    """Distinct parameters of the model (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_metrics(model: nn.Module, trainable: int) -> dict[str, Any]:
    total = model_params(model)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": trainable / max(total, 1)}


@torch.no_grad()
def max_output_change(model: nn.Module, before: Tensor, input_ids: Tensor) -> float:
    """max |logits_now - logits_before| on `input_ids` (used to report merge exactness)."""
    return float((_logits(model, input_ids) - before).abs().max())


@torch.no_grad()
def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    out = model(input_ids=input_ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()

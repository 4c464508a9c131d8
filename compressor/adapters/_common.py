"""Helpers shared by the adapter stages: targets, default learning rates, per-layer seeds,
quantized bases, adapter files, and the StageResult every adapter returns."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ConfigError, ModelError
from ..layers import CompressedLinear
from ..layers.base import base_weight, frozen_zeros, is_quantized  # noqa: F401  (re-exported)
from ..report.records import StageResult
from ..targeting import select_linears
from ..training.config import TrainConfig
from ..training.data import HEAD_NAME

ADAPTER_DIR = "adapter"


# -- targets -----------------------------------------------------------------------------------


def adapter_targets(model: nn.Module, targets=(), ignore=()) -> dict[str, nn.Module]:
    """`select_linears` minus the classification head the trainer adds to bare encoders: the
    trainer trains that head in full, so an adapter on it (or pruning it) is never wanted."""
    return select_linears(model, targets, (*ignore, HEAD_NAME))


def refuse_compressed(method: str, modules: dict[str, nn.Module]) -> None:
    """ConfigError when a target is already a compressed layer (adapters wrap plain linears)."""
    compressed = [n for n, m in modules.items() if isinstance(m, CompressedLinear)]
    if compressed:
        kind = type(modules[compressed[0]]).__name__
        raise ConfigError(
            f"{method}: target `{compressed[0]}` is already a compressed {kind} "
            f"({len(compressed)} such layer(s)); this stage wraps plain linears: add them to "
            "`ignore`, or train compressed layers with `heal`"
        )


def refuse_quantized(method: str, modules: dict[str, nn.Module], why: str) -> None:
    """ConfigError naming the quantized layers when a method needs a full-precision base."""
    quantized = [n for n, m in modules.items() if is_quantized(m)]
    if quantized:
        raise ConfigError(
            f"{method}: {len(quantized)} target layer(s) are bitsandbytes-quantized "
            f"(e.g. {quantized[0]}), but {why}; drop `load_in` from the recipe"
        )


# -- training settings -------------------------------------------------------------------------


def with_default_lr(config: TrainConfig, *, adamw: float, mezo: float) -> TrainConfig:
    """`config` with `lr` filled in from the method's defaults when the user left it unset.

    The trainer's own defaults (adamw 1e-4, mezo 1e-4) are for full fine-tuning; adapters train
    few parameters and their papers use larger rates (NOLA 1e-3, MeZO-LoRA 5e-5).
    """
    if config.lr is not None:
        return config
    return config.replace(lr=adamw if config.optimizer == "adamw" else mezo)


def run_seed(config: TrainConfig, ctx) -> int:
    return config.seed if config.seed is not None else int(getattr(ctx, "seed", 0) or 0)


def layer_seed(base_seed: int, name: str) -> int:
    """A 31-bit seed per layer, stable across runs and machines (crc32 of the module name)."""
    return (zlib.crc32(name.encode()) + 1_000_003 * int(base_seed)) % (2**31)


# -- files and results -------------------------------------------------------------------------


def adapter_folder(ctx) -> Path | None:
    """<out>/adapter, or None when the run writes nothing."""
    out = getattr(ctx, "out_dir", None)
    return Path(out) / ADAPTER_DIR if out is not None else None


def base_model_reference(ctx) -> str:
    """What an adapter's `base_model_name_or_path` records: the model the user passed (a Hub id
    as typed, a local path made absolute so it resolves from any folder). The embedded default
    has no Hub id; its folder inside the installed package is the one name that resolves."""
    from ..models import DEFAULT_MODEL_DIR

    source = str(getattr(ctx, "model_source", None) or "default")
    if source == "default":
        return str(DEFAULT_MODEL_DIR)
    path = Path(source).expanduser()
    return str(path.absolute()) if path.exists() else source


def write_adapter(
    folder: Path, tensors: dict[str, Tensor], config: dict[str, Any], filename: str
) -> dict[str, str]:
    """safetensors of `tensors` + adapter_config.json; returns the StageResult artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(cpu, str(folder / filename))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return {"adapter": str(folder / filename),
            "adapter_config": str(folder / "adapter_config.json")}


def read_adapter(folder: Path, filename: str, method: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, tensors) of an adapter folder `write_adapter` wrote; ModelError if not."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / filename))
    except (OSError, ValueError) as err:
        raise ModelError(f"`{folder}` is not a {method.upper()} adapter folder ({err}); pass the `adapter` "
                         f"folder a {method} run wrote") from None
    return config, tensors


def count_params(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


def param_metrics(model: nn.Module, method_params: int) -> dict[str, Any]:
    """`method_params`: what the method adds or unfreezes. The trainer's own `trainable_params`
    also counts a classification head it trains alongside (bare encoders only)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied once
    return {
        "method_params": method_params,
        "total_params": total,
        "method_fraction": method_params / max(total, 1),
    }


def plottable_curves(curves: dict[str, list]) -> dict[str, list[float]]:
    """Numeric series only: the trainer's `eval` list of {step, metric...} dicts becomes one
    `eval_<metric>` series per metric (the report plots every curve as numbers)."""
    flat: dict[str, list[float]] = {}
    for name, values in curves.items():
        if values and isinstance(values[0], dict):
            for key in values[0]:
                if key != "step":
                    flat[f"{name}_{key}"] = [float(v[key]) for v in values if key in v]
        else:
            flat[name] = [float(v) for v in values]
    return flat


def with_layer_type(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the layer role (`q_proj`, ...) that the report's per-layer plots colour by."""
    return [{**row, "type": row["module"].rsplit(".", 1)[-1]} for row in rows]


def finish(
    train,
    *,
    metrics: dict[str, Any] | None = None,
    per_module: list[dict[str, Any]] = (),
    artifacts: dict[str, str] | None = None,
    notes: list[str] = (),
    curves: dict | None = None,
    modified_model: bool = True,
) -> StageResult:
    """The StageResult of an adapter stage: the training run's metrics and curves plus its own.

    `modified_model=False` for an adapter kept separate: the run then writes the adapter folder
    alone, never a model folder that would pass for the base model."""
    return StageResult(
        metrics={**train.metrics(), **(metrics or {})},
        per_module=with_layer_type(list(per_module)),
        notes=list(notes),
        curves=plottable_curves(train.curves() if curves is None else curves),
        artifacts=dict(artifacts or {}),
        modified_model=modified_model,
    )

"""NOLA: LoRA factors as linear combinations of frozen random bases (Koohpayegani et al.,
ICLR 2024, arXiv 2310.02556; reference code UCDvision/NOLA).

With peft's LoRA naming, A (r, in) is applied first and B (out, r) second:

    ΔW = (α/r) · B · A,   A = A₀ + Σ_{i<k} a_i A_i,   B = Σ_{j<l} b_j B_j

(METHODS.md §7 writes the product as A·B with A (m×r): the same maths, factors named the other
way.) A_i, B_j ~ U(−1, 1)/√(number of bases) come from one seed per layer and are never saved. A₀
is a fixed Kaiming-uniform matrix from the same seed (the official code's frozen lora_A weight)
and B has no fixed part, so ΔW = 0 at step 0 while B's coefficients already get gradients; A's
start moving once B ≠ 0. Only the k + l coefficients train; the adapter file holds them and the
seed, nothing else.

By default the bases are regenerated chunk by chunk in the forward and again in the backward pass,
as the official code does (memory: one chunk); `cache_bases` keeps them as non-persistent buffers
(faster; k·r·in + l·out·r floats per layer, reported as `basis_cache_bytes`).

Unmerged, the run writes only the adapter folder (`<out>/adapter`: coefficients, seeds, config
with `base_model_name_or_path`; `load_nola_adapter(base, folder)` applies it); `merge: true`
writes the merged dense model instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..configs.nola import NolaConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..layers import NolaLinear
from ..layers._nola_bases import (  # noqa: F401  (re-exported: the pure maths of this method)
    BASES_A,
    BASES_B,
    BASIS_CHUNK,
    FIXED,
    basis_chunks,
    combine_bases,
    kaiming_fixed,
    nola_factors,
    random_bases,
    stream_seed,
)  # fmt: skip
from ..registry import register
from ..report.records import StageResult
from ..targeting import replace_module
from ..training import fit
from ._common import (
    adapter_folder,
    adapter_targets,
    base_model_reference,
    count_params,
    finish,
    layer_seed,
    param_metrics,
    read_adapter,
    refuse_compressed,
    run_seed,
    with_default_lr,
    write_adapter,
)  # fmt: skip

ADAPTER_FILE = "nola_adapter.safetensors"


# -- wiring ------------------------------------------------------------------------------------


def install_nola(model: nn.Module, config: NolaConfig, base_seed: int) -> dict[str, NolaLinear]:
    """Replace every target linear by a NolaLinear (ΔW = 0); returns them by name."""
    modules = adapter_targets(model, config.targets, config.ignore)
    refuse_compressed("nola", modules)
    layers = {}
    for name, module in modules.items():
        layers[name] = NolaLinear.from_linear(
            module, rank=config.r, num_basis_a=config.num_basis_a,
            num_basis_b=config.num_basis_b, alpha=config.alpha,
            seed=layer_seed(base_seed, name), cache_bases=config.cache_bases)  # fmt: skip
        replace_module(model, name, layers[name])
    return layers


def coefficient_params(model: nn.Module) -> dict[str, nn.Parameter]:
    suffixes = (".nola_coef_a", ".nola_coef_b")
    return {n: p for n, p in model.named_parameters() if n.endswith(suffixes)}


def save_nola_adapter(layers: dict[str, NolaLinear], folder: Path, base: str | None = None) -> dict[str, str]:
    """The coefficients and one int64 seed per layer, plus adapter_config.json; nothing else."""
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.nola_coef_a"] = layer.nola_coef_a
        tensors[f"{name}.nola_coef_b"] = layer.nola_coef_b
        tensors[f"{name}.nola_seed"] = torch.tensor([layer.seed], dtype=torch.int64)
    first = next(iter(layers.values()))
    config = {"method": "nola", "format_version": 1, "rank": first.rank, "alpha": first.alpha,
              "num_basis_a": first.num_basis_a, "num_basis_b": first.num_basis_b,
              "basis_chunk": BASIS_CHUNK, "target_modules": sorted(layers),
              "base_model_name_or_path": base,
              "bases": "U(-1,1)/sqrt(num_basis), CPU torch.Generator seeded 3*seed+1 (A), "
                       "3*seed+2 (B); A0 Kaiming-uniform from 3*seed"}  # fmt: skip
    return write_adapter(folder, tensors, config, ADAPTER_FILE)


def load_nola_adapter(model: nn.Module, folder: str | Path, *,
                      cache_bases: bool = False) -> dict[str, NolaLinear]:
    """Install a saved NOLA adapter into a fresh copy of its base model (in place)."""
    config, tensors = read_adapter(Path(folder), ADAPTER_FILE, "nola")
    layers = {}
    for name in config["target_modules"]:
        layer = NolaLinear.from_linear(
            model.get_submodule(name), rank=config["rank"], num_basis_a=config["num_basis_a"],
            num_basis_b=config["num_basis_b"], alpha=config["alpha"],
            seed=int(tensors[f"{name}.nola_seed"][0]), cache_bases=cache_bases)  # fmt: skip
        with torch.no_grad():
            layer.nola_coef_a.copy_(tensors[f"{name}.nola_coef_a"])
            layer.nola_coef_b.copy_(tensors[f"{name}.nola_coef_b"])
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


@register(NolaConfig)
def apply(model: nn.Module, config: NolaConfig, ctx: Context) -> StageResult:
    """Install NOLA on the targets, train only the coefficients, save them, optionally merge."""
    config = with_default_lr(config, adamw=1e-3, mezo=5e-5)
    layers = install_nola(model, config, run_seed(config, ctx))
    params = coefficient_params(model)
    result = fit(model, params, config, ctx, method="nola")
    folder = adapter_folder(ctx)
    artifacts = save_nola_adapter(layers, folder, base_model_reference(ctx)) if folder else {}
    rows = [_row(name, layer) for name, layer in layers.items()]
    if config.merge:
        for name, layer in layers.items():
            replace_module(model, name, layer.to_linear())
    lora_same_rank = sum(r["lora_params_same_rank"] for r in rows)
    metrics = {
        **param_metrics(model, count_params(params)), "adapted_layers": len(layers),
        "lora_params_same_rank": lora_same_rank,
        "fraction_of_lora_same_rank": count_params(params) / max(lora_same_rank, 1),
        "basis_cache_bytes": sum(layer.basis_cache_bytes() for layer in layers.values()),
        "adapter_file_bytes": Path(artifacts["adapter"]).stat().st_size if artifacts else 0,
        "merged": config.merge,
    }  # fmt: skip
    return finish(result, metrics=metrics, per_module=rows, artifacts=artifacts,
                  modified_model=config.merge)


def _row(name: str, layer: NolaLinear) -> dict[str, Any]:
    return {"module": name, "shape": [layer.out_features, layer.in_features], "seed": layer.seed,
            "trainable": layer.num_basis_a + layer.num_basis_b,
            "lora_params_same_rank": layer.rank * (layer.in_features + layer.out_features),
            "delta_norm": float(layer.delta_weight().detach().norm())}

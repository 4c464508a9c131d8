"""DSEE: dually sparsity-embedded efficient tuning (Chen et al., ACL 2023, arXiv 2111.00160;
reference code VITA-Group/DSEE).

Two sparsities:

1. The update is low-rank plus sparse, W = W₀ + (α/r)(B A + S₂). B A is a LoRA and S₂ has a
   fixed support Ω of `num_sparse` entries per matrix, chosen before training from a GreBsmo
   low-rank + sparse decomposition of the *pretrained* W₀ ≈ U V + S (Ω = top-N |S|). Only the N
   values on Ω are parameters and Ω is stored as two index buffers, so training cannot touch
   any other entry. Applied to the query and value projections by default.
2. The final weights are sparse: after tuning, the merged weights W₀ + ΔW are scored by
   magnitude (global L1 over every `prune_targets` linear, or N:M per row), W₀ is masked by that
   score (the update stays unmerged), and LoRA + S₂ are re-tuned for `retune_steps` on the
   pruned backbone. FLOPs are counted on non-zero weights (what a sparse kernel executes).

Pruning reuses the `prune` method's mask functions (compressor.methods.prune). Unmerged, the run
writes DSEE's own adapter folder (`<out>/adapter`: A, B, S₂ and Ω per adapted linear, a bit-packed
keep-mask per pruned linear; `load_dsee_adapter(base, folder)` applies it to the untouched base)
and no model folder; `merge: true` writes the merged (dense) model instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..configs.dsee import DEFAULT_TARGETS, POSITIVE_INTS, DseeConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..kernels.packing import pack_bits, unpack_bits
from ..layers import DseeLinear
from ..methods._sparse_pattern import magnitude_scores, prune_mask
from ..registry import register
from ..report.records import StageResult
from ..targeting import linear_shape, linear_weight, replace_module
from ..training import TrainResult, fit
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
    refuse_quantized,
    run_seed,
    with_default_lr,
    write_adapter,
)
from ._dsee_math import (  # noqa: F401  (re-exported: the pure maths of this method)
    global_magnitude_masks,
    grebsmo,
    hard_threshold,
    layer_flops,
    random_support,
    sparse_dense,
    top_support,
)

FLOPS_NOTE = ("FLOPs count non-zero weights: the saving needs a sparse kernel (N:M patterns have "
              "one; unstructured zeros run dense otherwise)")
ADAPTER_FILE = "dsee_adapter.safetensors"


# -- wiring ------------------------------------------------------------------------------------


def choose_support(weight: Tensor, config: DseeConfig, seed: int) -> tuple[Tensor, Tensor]:
    """Ω for one pretrained W₀ (out, in) -> (rows, cols) of `num_sparse` entries."""
    if config.sparse_method == "random":
        return random_support(tuple(weight.shape), config.num_sparse, seed)
    if config.sparse_method == "magnitude":
        return top_support(weight, config.num_sparse)
    _, _, sparse = grebsmo(
        weight, iterations=config.grebsmo_iterations, inner=config.grebsmo_inner,
        threshold=config.grebsmo_threshold, rank_step=config.grebsmo_rank_step,
        max_rank=max(1, int(config.grebsmo_max_rank * min(weight.shape))), seed=seed,
    )  # fmt: skip
    return top_support(sparse, config.num_sparse)


def install_dsee(model: nn.Module, config: DseeConfig, ctx: Context,
                 seed: int) -> dict[str, DseeLinear]:
    """Replace every target by a DseeLinear whose Ω comes from its pretrained weight (ΔW = 0)."""
    modules = adapter_targets(model, config.targets, config.ignore)
    refuse_quantized("dsee", modules, "DSEE prunes the base weights, which needs full precision")
    refuse_compressed("dsee", modules)
    layers = {}
    for name, module in ctx.progress(list(modules.items()), f"dsee: Ω by {config.sparse_method}"):
        layer_seed_ = layer_seed(seed, name)
        support = choose_support(linear_weight(module).detach().float(), config, layer_seed_)
        layers[name] = DseeLinear.from_linear(module, support, rank=config.r,
                                              alpha=config.alpha, seed=layer_seed_)
        replace_module(model, name, layers[name])
    return layers


def dsee_params(layers: dict[str, DseeLinear]) -> dict[str, nn.Parameter]:
    names = ("lora_a", "lora_b", "delta_values")
    return {f"{n}.{p}": getattr(layer, p) for n, layer in layers.items() for p in names}


def _base(module: nn.Module) -> Tensor:
    """The stored base weight, in place: DseeLinear's W₀, or the linear's own (Conv1D: a view)."""
    return module.weight if isinstance(module, DseeLinear) else linear_weight(module)


def prune_backbone(model: nn.Module, config: DseeConfig) -> dict[str, Tensor]:
    """Mask W₀ of every prune target by |W₀ + ΔW| (the merged weight); returns the keep-masks.

    The update stays unmerged (DSEE restores the unmerged W under the new mask), and W₀ is
    frozen, so the zeros survive re-tuning.
    """
    modules = adapter_targets(model, config.prune_targets)
    refuse_quantized("dsee", modules, "pruning needs full-precision weights")
    refuse_compressed("dsee", {n: m for n, m in modules.items() if not isinstance(m, DseeLinear)})
    scores = {n: magnitude_scores(m.dense_weight() if isinstance(m, DseeLinear) else _base(m))
              for n, m in modules.items()}
    if config.prune == "unstructured":
        masks = global_magnitude_masks(scores, config.prune_ratio)
    else:
        masks = {n: prune_mask(s, config.prune) for n, s in scores.items()}
    with torch.no_grad():
        for name, module in modules.items():
            weight = _base(module)
            weight.mul_(masks[name].to(weight.dtype))
    return masks


def flop_rows(model: nn.Module, names: list[str]) -> list[dict[str, Any]]:
    """Per-token FLOPs of each named linear: dense vs as it now runs (non-zeros + adapter)."""
    rows = []
    for name in names:
        module = model.get_submodule(name)
        out_f, in_f = linear_shape(module)
        adapter = (module.rank, module.num_sparse) if isinstance(module, DseeLinear) else (0, 0)
        nonzero = int(torch.count_nonzero(_base(module)))
        rows.append({"module": name, "shape": [out_f, in_f],
                     "weight_density": nonzero / (out_f * in_f),
                     "flops_dense": layer_flops(out_f, in_f, out_f * in_f),
                     "flops_now": layer_flops(out_f, in_f, nonzero, adapter),
                     "trainable": adapter[0] * (out_f + in_f) + adapter[1]})  # fmt: skip
    return rows


def prune_and_retune(model: nn.Module, params: dict[str, nn.Parameter], config: DseeConfig,
                     ctx: Context) -> tuple[dict[str, Tensor], TrainResult | None]:
    """Prune the backbone, then re-tune LoRA + S₂ for `retune_steps` (None when 0 steps).
    Returns the keep-masks of the pruned linears and the re-tuning run."""
    pruned = prune_backbone(model, config)
    steps = config.steps if config.retune_steps is None else config.retune_steps
    if not steps:
        return pruned, None
    retune = config.replace(steps=steps, resume=None)
    return pruned, fit(model, params, retune, ctx, method="dsee-retune")


@register(DseeConfig)
def apply(model: nn.Module, config: DseeConfig, ctx: Context) -> StageResult:
    """LoRA + S₂ on Ω, tune; prune the backbone by merged magnitude; re-tune; count FLOPs."""
    config = with_default_lr(config, adamw=2e-4, mezo=5e-5)
    layers = install_dsee(model, config, ctx, run_seed(config, ctx))
    params = dsee_params(layers)
    first = fit(model, params, config, ctx, method="dsee")
    pruned, retune = {}, None
    if config.prune != "none":
        pruned, retune = prune_and_retune(model, params, config, ctx)
    last, metrics, curves = retune or first, {}, first.curves()
    if retune is not None:
        metrics.update({f"retune_{k}": v for k, v in retune.metrics().items()})
        curves.update({f"retune_{k}": v for k, v in retune.curves().items()})
    folder = adapter_folder(ctx)
    artifacts = {}
    if folder is not None and not config.merge:
        artifacts = save_dsee_adapter(layers, pruned, folder, base_model_reference(ctx))
    if config.merge:  # ΔW fills the zeros: the FLOP rows below then show the dense cost
        for name, layer in layers.items():
            replace_module(model, name, layer.to_linear())
    rows = flop_rows(model, sorted(set(layers) | set(pruned)))
    dense, now = sum(r["flops_dense"] for r in rows), sum(r["flops_now"] for r in rows)
    metrics.update({f"{k}_final": v for k, v in last.eval_after.items()})
    metrics.update({**param_metrics(model, count_params(params)), "adapted_layers": len(layers),
                    "pruned_layers": len(pruned), "flops_per_token_dense": dense,
                    "flops_per_token_dsee": now, "flops_saved_fraction": 1 - now / max(dense, 1),
                    "merged": config.merge})  # fmt: skip
    return finish(first, metrics=metrics, per_module=rows, notes=[FLOPS_NOTE], curves=curves,
                  artifacts=artifacts, modified_model=config.merge)


# -- the adapter folder ------------------------------------------------------------------------


def save_dsee_adapter(layers: dict[str, DseeLinear], masks: dict[str, Tensor], folder: Path,
                      base: str | None = None) -> dict[str, str]:
    """DSEE's own adapter format, applied to the untouched base model by `load_dsee_adapter`:
    per adapted linear A, B, S₂'s values and its support Ω; per pruned linear its keep-mask,
    bit-packed (8 weights a byte, little-endian along in_features)."""
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        for key in ("lora_a", "lora_b", "delta_values", "delta_rows", "delta_cols"):
            tensors[f"{name}.{key}"] = getattr(layer, key)
    for name, mask in masks.items():
        tensors[f"{name}.keep_mask"] = pack_bits(mask)
    first = next(iter(layers.values()))
    config = {"method": "dsee", "format_version": 1, "rank": first.rank, "alpha": first.alpha,
              "target_modules": sorted(layers), "pruned_modules": sorted(masks),
              "base_model_name_or_path": base,
              "keep_mask": "uint8 bits, bit j of byte b = column 8b + j; pruned modules are masked "
                           "before the adapters are installed"}  # fmt: skip
    return write_adapter(folder, tensors, config, ADAPTER_FILE)


def load_dsee_adapter(model: nn.Module, folder: str | Path) -> dict[str, DseeLinear]:
    """Apply a saved DSEE adapter to a fresh copy of its base model (in place): mask the pruned
    linears, then install the DseeLinear layers (their W₀ is the masked weight)."""
    config, tensors = read_adapter(Path(folder), ADAPTER_FILE, "dsee")
    with torch.no_grad():
        for name in config["pruned_modules"]:
            weight = linear_weight(model.get_submodule(name))
            weight.mul_(unpack_bits(tensors[f"{name}.keep_mask"], weight.shape[1]).to(weight.dtype))
    layers = {}
    for name in config["target_modules"]:
        support = (tensors[f"{name}.delta_rows"], tensors[f"{name}.delta_cols"])
        layer = DseeLinear.from_linear(model.get_submodule(name), support, rank=config["rank"],
                                       alpha=config["alpha"], seed=0)
        with torch.no_grad():
            for key in ("lora_a", "lora_b", "delta_values"):
                getattr(layer, key).copy_(tensors[f"{name}.{key}"])
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


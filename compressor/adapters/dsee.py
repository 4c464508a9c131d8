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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..context import Context
from ..errors import ConfigError
from ..kernels.packing import pack_bits, unpack_bits
from ..layers import DseeLinear
from ..methods._sparse_pattern import magnitude_scores, prune_mask
from ..registry import register
from ..report.records import StageResult
from ..targeting import linear_shape, linear_weight, replace_module
from ..training import TrainConfig, TrainResult, fit
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

DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value")  # Llama/Mistral/Qwen and BERT names
FLOPS_NOTE = ("FLOPs count non-zero weights: the saving needs a sparse kernel (N:M patterns have "
              "one; unstructured zeros run dense otherwise)")
ADAPTER_FILE = "dsee_adapter.safetensors"
POSITIVE_INTS = ("r", "num_sparse", "grebsmo_iterations", "grebsmo_inner", "grebsmo_rank_step")


@dataclass(frozen=True, kw_only=True)
class DseeConfig(TrainConfig):
    """Args (plus every `TrainConfig` field):
    targets: linears that get LoRA + S₂; default the query and value projections.
    r: LoRA rank (peft's name; DSEE scripts: 16).
    alpha: LoRA alpha; the update (B A + S₂) is scaled by alpha / r.
    num_sparse: N, entries of S₂ per adapted matrix (DSEE: 64 for SST-2, 16 for RTE).
    sparse_method: how Ω is chosen: "grebsmo" (top-N |S| of W₀ ≈ U V + S, the paper's),
        "magnitude" (top-N |W₀|, the code's `omp`) or "random" (the code's `rp`).
    grebsmo_iterations: outer GreBsmo iterations; the rank grows after each (DSEE: 100).
    grebsmo_inner: alternations U, V, S per outer iteration (METHODS: 2).
    grebsmo_rank_step: rows appended to V after each outer iteration (METHODS: 5).
    grebsmo_threshold: S keeps entries of W − U V with |·| >= this (DSEE: 0.01, absolute).
    grebsmo_max_rank: the rank of U V stops growing at this fraction of min(out, in). DSEE's
        100 × 5 rows reach rank 501 of BERT-base's 768; on small matrices the rank would reach
        full, where S vanishes and Ω would be arbitrary.
    prune: "unstructured" (global magnitude over all `prune_targets`), "N:M" such as "2:4"
        (per row along in_features), or "none".
    prune_ratio: fraction of the `prune_targets` weights removed by "unstructured" (DSEE: 0.5).
    prune_targets: linears whose weights are pruned; empty = every linear but lm_head and
        embeddings (DSEE prunes all q, k, v and dense weights of the encoder).
    retune_steps: training steps after pruning; None = `steps`.
    merge: after re-tuning, fold B A and S₂ into dense nn.Linear weights (outputs unchanged;
        ΔW then fills the pruning zeros, so the FLOP savings are gone: keep it off for them).
    lr: None = 2e-4 with adamw (DSEE's SST-2 rate), 5e-5 with mezo.
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    renamed: ClassVar[dict[str, str]] = {"rank": "r (peft's name for the adapter rank)"}

    r: int = 16
    alpha: float = 32.0
    num_sparse: int = 64
    sparse_method: str = "grebsmo"
    grebsmo_iterations: int = 100
    grebsmo_inner: int = 2
    grebsmo_rank_step: int = 5
    grebsmo_threshold: float = 0.01
    grebsmo_max_rank: float = 0.5
    prune: str = "unstructured"
    prune_ratio: float = 0.5
    prune_targets: tuple[str, ...] = ()
    retune_steps: int | None = None
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in POSITIVE_INTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dsee: `{key}` must be an integer >= 1, got {value!r}")
        if self.sparse_method not in ("grebsmo", "magnitude", "random"):
            raise ConfigError(f"dsee: `sparse_method` must be 'grebsmo', 'magnitude' or 'random', "
                              f"got {self.sparse_method!r}")
        if not 0 < self.grebsmo_max_rank <= 1:
            raise ConfigError(f"dsee: `grebsmo_max_rank` is a fraction of min(out, in) in (0, 1], "
                              f"got {self.grebsmo_max_rank}")
        if not _valid_prune(self.prune):
            raise ConfigError(f"dsee: `prune` must be 'unstructured', 'none' or 'N:M' with "
                              f"0 < N < M such as '2:4', got {self.prune!r}")
        if not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"dsee: `prune_ratio` is the fraction of weights removed, in "
                              f"[0, 1), got {self.prune_ratio}; DSEE uses 0.5")
        retune = self.retune_steps
        if retune is not None and (isinstance(retune, bool) or retune < 0):
            raise ConfigError(f"dsee: `retune_steps` must be an integer >= 0, got {retune!r}")
        if not self.alpha > 0:
            raise ConfigError(f"dsee: `alpha` must be > 0, got {self.alpha}")


def _valid_prune(prune: str) -> bool:
    if prune in ("none", "unstructured"):
        return True
    parts = prune.split(":")
    return len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1])


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


@register("dsee", DseeConfig, kind="finetune")
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


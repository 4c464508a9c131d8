"""prune: N:M (default 2:4) or unstructured pruning by magnitude, Wanda or SparseGPT.

Scores: `magnitude` |W_ij|; `wanda` |W_ij| * ||X_j||_2 (Sun et al., "A Simple and Effective Pruning
Approach for LLMs", arXiv 2306.11695), with ||X_j||_2 the L2 norm of input feature j over the
calibration tokens, gathered block by block on the already-pruned model. `sparsegpt` (Frantar &
Alistarh, arXiv 2301.00774; maths in `_sparsegpt.py`) both chooses the mask and updates the kept
weights with the OBS rule over the inverse of H = XᵀX, gathered the same way. N:M keeps the N best
scores of every M consecutive weights along the input dim of each row (the layout of NVIDIA's
2:4 sparse tensor cores) and stores the result packed in an `NMSparseLinear` (values + bit-packed
positions, forward via `compressor.kernels.dispatch.nm_linear`). Unstructured pruning zeroes weights of the
nn.Linear in place (a dense tensor holding zeros: no bytes are saved on disk).

The mask functions are pure and live in `_sparse_pattern.py` (DSEE uses them without registering
`prune`); they are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import CalibrationHooks, LayerStats, compress_blocks, compress_each
from ..configs.prune import PruneConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..kernels.dispatch import compress_nm_indices, nm_mask  # noqa: F401  (nm_mask: re-exported)
from ..layers import CompressedLinear, NMSparseLinear, dense_linear
from ..registry import register
from ..report.records import StageResult
from ..targeting import layer_type, linear_shape, linear_weight, select_linears
from ._dsformer_factor import parse_pattern
from ._sparse_pattern import (  # noqa: F401  (the masks prune applies; re-exported)
    magnitude_mask,
    magnitude_scores,
    prune_mask,
    unstructured_mask,
    wanda_scores,
)
from ._sparsegpt import output_error, sparsegpt_prune

__all__ = [
    "NMSparseLinear",
    "PruneConfig",
    "magnitude_mask",
    "magnitude_scores",
    "nm_mask",
    "prune_mask",
    "sparsegpt_prune",
    "unstructured_mask",
    "wanda_scores",
]


# -- pure scores and masks ---------------------------------------------------------------------


def nm_sparse_bytes(out_f: int, in_f: int, n: int, m: int, value_bytes: int) -> dict[str, int]:
    """Stored bytes of an NMSparseLinear weight: values + bit-packed positions (bias excluded)."""
    slots = in_f // m * n
    packed = compress_nm_indices(torch.zeros(1, slots, dtype=torch.uint8), m).shape[-1]
    return {
        "value_bytes": out_f * slots * value_bytes,
        "index_bytes": out_f * packed,
        "total_bytes": out_f * (slots * value_bytes + packed),
    }


# -- wiring ------------------------------------------------------------------------------------


def _check_divisible(selected: dict[str, nn.Module], pattern: str, m: int) -> None:
    bad = [
        f"{name} (in_features={linear_shape(mod)[1]})"
        for name, mod in selected.items()
        if linear_shape(mod)[1] % m
    ]
    if bad:
        raise ConfigError(
            f"prune: `pattern`={pattern!r} needs in_features divisible by M={m}, but {len(bad)} layer(s) are not: "
            f"{', '.join(bad[:6])}; add them to `ignore` or use `pattern: unstructured`"
        )


def _prune_one(
    name: str, module: nn.Module, stat: Tensor | None, config: PruneConfig, rows: list
) -> nn.Module | None:
    """Prune one linear; returns its replacement (None = pruned in place). Appends its report row.

    stat: None (magnitude), the squared input norms (wanda) or the input Hessian (sparsegpt).
    """
    # a copy: unstructured pruning writes into the module's own weight, which the row compares to
    weight = linear_weight(module).detach().clone()
    pruned, mask = _pruned_weight(weight, stat, config)
    parsed = parse_pattern(config.pattern)
    new = _pruned_module(module, pruned, mask, parsed)
    out_f, in_f = weight.shape
    value_bytes = weight.element_size()
    if parsed.structured:
        sizes = nm_sparse_bytes(out_f, in_f, parsed.n, parsed.m, value_bytes)
        params, stored, index = (
            out_f * in_f // parsed.m * parsed.n,
            sizes["total_bytes"],
            sizes["index_bytes"],
        )
    else:  # zeros stored densely: no bytes saved
        params, stored, index = int(mask.sum()), out_f * in_f * value_bytes, 0
    rows.append(
        {
            "module": name,
            "type": layer_type(name),
            "shape": f"{out_f}x{in_f}",
            "pattern": config.pattern,
            "score": config.score if stat is not None else "magnitude",
            "sparsity": round(1 - mask.float().mean().item(), 4),
            "params": params,
            "dense_bytes": out_f * in_f * value_bytes,
            "stored_bytes": stored,
            "index_bytes": index,
            "keep_bytes": round(stored / (out_f * in_f * value_bytes), 4),
            "relative_error": float((weight - pruned).norm() / weight.norm().clamp_min(1e-30)),
            **_output_errors(weight, pruned, mask, stat),
        }
    )
    return new


def _pruned_weight(weight: Tensor, stat: Tensor | None, config: PruneConfig) -> tuple[Tensor, Tensor]:
    """(pruned weight, keep-mask) of one (out, in) weight from its calibration statistic."""
    if config.score == "sparsegpt" and stat is not None:
        return sparsegpt_prune(
            weight,
            stat,
            pattern=config.pattern,
            sparsity=config.sparsity,
            block_size=config.block_size,
            dampening=config.dampening,
        )
    scores = wanda_scores(weight, stat.sqrt()) if stat is not None else magnitude_scores(weight)
    per_row = config.group == "row" or (config.group == "auto" and config.score == "wanda")
    mask = prune_mask(scores, config.pattern, config.sparsity, per_row)
    return weight * mask, mask


def _output_errors(weight: Tensor, pruned: Tensor, mask: Tensor, stat: Tensor | None) -> dict:
    """With a Hessian: the relative calibration output error, and masking alone's for reference."""
    if stat is None or stat.dim() != 2:
        return {}
    return {
        "output_error": round(output_error(weight, pruned, stat), 6),
        "output_error_mask_only": round(output_error(weight, weight * mask, stat), 6),
    }


def _pruned_module(module: nn.Module, pruned: Tensor, mask: Tensor, parsed) -> nn.Module | None:
    bias = getattr(module, "bias", None)
    if parsed.structured:
        return NMSparseLinear.from_dense(pruned, parsed.n, parsed.m, bias)
    if isinstance(module, CompressedLinear):  # e.g. a factored layer: keep its pruned dense product
        return dense_linear(pruned, bias)
    with torch.no_grad():  # nn.Linear / Conv1D: write in place (Conv1D stores W transposed)
        module.weight.copy_(pruned.T if type(module).__name__ == "Conv1D" else pruned)
    return None


def _hooks(config: PruneConfig, rows: list) -> CalibrationHooks:
    """The engine hooks: Wanda reads ‖X_j‖²/N, SparseGPT X Xᵀ/N as summed (not symmetrised)."""
    kind = {"wanda": "sq_norm", "sparsegpt": "hessian"}.get(config.score)

    def compress(name: str, module: nn.Module, stats: LayerStats | None) -> nn.Module | None:
        stat = None if stats is None else stats.mean_square() if kind == "sq_norm" else stats.second_moment()
        return _prune_one(name, module, stat, config, rows)

    # unstructured pruning writes the zeros into the module's own weight
    return CalibrationHooks(kind, compress, in_place=not parse_pattern(config.pattern).structured)


@register(PruneConfig)
def apply(model: nn.Module, config: PruneConfig, ctx: Context) -> StageResult:
    """Prune every targeted linear (N:M -> NMSparseLinear; unstructured -> zeros in place)."""
    selected = select_linears(model, config.targets, config.ignore)
    parsed = parse_pattern(config.pattern)
    if parsed.structured:
        _check_divisible(selected, config.pattern, parsed.m)
    rows: list[dict[str, Any]] = []
    notes = []
    hooks = _hooks(config, rows)
    if hooks.stats is None:
        compress_each(model, selected, hooks, ctx, description="prune")
        return StageResult(metrics=_summary(rows), per_module=rows, notes=notes)
    windows = ctx.windows(
        config.calibration,
        split="calib",
        seq_len=config.seq_len,
        num_windows=config.num_windows,
    )
    outside = compress_blocks(
        model, selected, hooks, windows, ctx, batch_size=config.batch_size, description=config.score
    ).outside
    if outside:
        notes.append(
            f"{len(outside)} linear(s) outside the transformer blocks were pruned by magnitude: "
            f"{', '.join(outside[:4])}"
        )
    return StageResult(metrics=_summary(rows), per_module=rows, notes=notes)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    dense = sum(r["dense_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    weights = sum(int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) for r in rows)
    kept = sum(r["params"] for r in rows)
    return {
        "layers": len(rows),
        "sparsity": round(1 - kept / max(weights, 1), 4),
        "params_kept": kept,
        "params_dense": weights,
        "stored_bytes": stored,
        "dense_bytes": dense,
        "keep_ratio_bytes": round(stored / max(dense, 1), 4),
        "mean_relative_error": round(sum(r["relative_error"] for r in rows) / max(len(rows), 1), 4),
        **_mean_output_errors(rows),
    }


def _mean_output_errors(rows: list[dict[str, Any]]) -> dict[str, float]:
    calibrated = [r for r in rows if "output_error" in r]
    if not calibrated:
        return {}
    return {
        key: round(sum(r[key] for r in calibrated) / len(calibrated), 6)
        for key in ("output_error", "output_error_mask_only")
    }

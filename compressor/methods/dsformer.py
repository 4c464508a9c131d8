"""dsformer: dense x sparse factorization W ~ D S (N:M-sparse S), refined by straight-through training.

Chand, Prabhu, Kumar, "DSFormer", arXiv 2312.13211 (no public code).

Each targeted W (out, in) becomes D (out, k) dense times S (k, in) holding exactly N of every M
consecutive entries along k in each column (default 2:4, so S packs for 2:4 kernels), or with
`pattern: unstructured` the top `density`*k entries of each column. Every column of W is a sparse
combination of atoms of a small dictionary D.

`keep_bytes` is a KEEP ratio in stored BYTES: bytes(D) + bytes(S values) + bytes(S index metadata) <=
keep_bytes * bytes(dense W), values in the model dtype and, for N:M, positions bit-packed at
nm_index_bits(M) bits (2 bits for 2:4) as the checkpoint stores them; k is the largest multiple of
M that fits. (Equal bytes is the fair comparison with low-rank methods, whose factors carry no
metadata.)

1. Initialisation (per layer, block by block on the already-compressed model): alternate sparse
   coding of S (support chosen by SparseGPT's rule on the whitened problem, `coding: sparsegpt`,
   or by the top-N-of-M projection of the least-squares S, `coding: projection`; values refined
   on the support) with least-squares updates of D, on the whitened objective ||(W - D S) X||_F
   with H = X X^T from calibration windows (`init: whitened`), or on ||W - D S||_F (`init: plain`).
2. STF (`stf_steps` > 0): train D and a dense latent S~ end to end on the LM loss (+ KL to the dense
   teacher with `distill: true`); forward uses the projection of S~, backward is straight-through.
3. Pack: `DenseSparseLinear` stores D and S packed (values + bit-packed positions) and runs
   `compressor.kernels.dispatch.dense_sparse_linear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import CalibrationHooks, LayerStats, compress_blocks, compress_each
from ..configs.dsformer import DSFormerConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..evaluation import perplexity
from ..layers import DenseSparseLinear
from ..models import require_causal_lm
from ..registry import register
from ..report.records import StageResult
from ..targeting import layer_type, linear_shape, linear_weight, replace_module, select_linears
from ._dsformer_factor import (
    SparsePattern,
    dense_sparse_bytes,
    fit_dense_sparse,
    parse_pattern,
    solve_inner_dim,
    whitened_error,
)
from ._dsformer_stf import DenseSparseTrainable, frozen_teacher, train_stf

__all__ = [
    "DSFormerConfig",
    "DenseSparseLinear",
    "pack_trained",
    "plan_inner_dims",
    "unpack_for_training",
]


# -- planning: k per layer, with every impossible layer reported at once -----------------------


def plan_inner_dims(
    shapes: dict[str, tuple[int, int]], config: DSFormerConfig, value_bytes: int
) -> dict[str, int]:
    """k per layer from `keep_bytes` (or `k`); raises one ConfigError listing every layer that cannot fit."""
    pattern = parse_pattern(config.pattern, config.density)
    plan, problems = {}, []
    for name, (out_f, in_f) in shapes.items():
        k = config.k or solve_inner_dim(out_f, in_f, config.keep_bytes, pattern, value_bytes)
        limit = min(out_f, in_f)
        if config.k is None and k < (pattern.m or 1):
            smallest = dense_sparse_bytes(out_f, in_f, pattern.m or 1, pattern, value_bytes)[
                "total_bytes"
            ]
            problems.append(
                f"{name} ({out_f}x{in_f}): even k={pattern.m or 1} needs "
                f"{smallest / (out_f * in_f * value_bytes):.3f} of the dense bytes "
                f"(D + S values + index metadata) > `keep_bytes`={config.keep_bytes}"
            )
        elif k > limit:
            problems.append(
                f"{name} ({out_f}x{in_f}): k={k} exceeds min(out, in)={limit}"
                + (
                    ""
                    if config.k
                    else f" (lower `keep_bytes` to <= {_max_keep(out_f, in_f, pattern, value_bytes):.3f})"
                )
            )
        plan[name] = k
    if problems:
        raise ConfigError(
            f"dsformer: {len(problems)} layer(s) cannot be factored as asked: "
            f"{'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}; "
            "change `keep_bytes`/`k`, or add these layers to `ignore`"
        )
    return plan


def _max_keep(out_f: int, in_f: int, pattern: SparsePattern, value_bytes: int) -> float:
    step = pattern.m or 1
    k = min(out_f, in_f) // step * step
    return dense_sparse_bytes(out_f, in_f, k, pattern, value_bytes)["total_bytes"] / (
        out_f * in_f * value_bytes
    )


# -- wiring -----------------------------------------------------------------------------------


def _factor_one(
    name: str,
    module: nn.Module,
    h: Tensor | None,
    k: int,
    config: DSFormerConfig,
    rows: dict[str, dict],
) -> nn.Module:
    weight = linear_weight(module).detach()
    pattern = parse_pattern(config.pattern, config.density)
    d, s, history = fit_dense_sparse(
        weight,
        k,
        pattern,
        h if config.init == "whitened" else None,
        iters=config.init_iters,
        cg_iters=config.cg_iters,
        coding=config.coding,
    )
    bias = getattr(module, "bias", None)
    out_f, in_f = weight.shape
    sizes = dense_sparse_bytes(out_f, in_f, k, pattern, weight.element_size())
    rows[name] = {
        "module": name,
        "type": layer_type(name),
        "shape": f"{out_f}x{in_f}",
        "k": k,
        "pattern": pattern.describe(),
        "params": out_f * k + in_f * pattern.nnz_per_column(k),
        "stored_bytes": int(sizes["total_bytes"]),
        "index_bytes": int(sizes["s_index_bytes"]),
        "keep_bytes": round(sizes["total_bytes"] / (out_f * in_f * weight.element_size()), 4),
        "init_error": round(history[0], 5),
        "fit_error": round(min(history), 5),
        "weight_error": round(whitened_error(weight, d, s, None), 5),
    }
    if h is None and config.init == "whitened":
        rows[name]["init"] = "plain (no calibration statistics)"
    if config.stf_steps > 0:
        return DenseSparseTrainable(d, s, bias, pattern)
    return DenseSparseLinear.from_factors(d, s, pattern, bias)


def _eval(model: nn.Module, windows: Tensor | None, batch_size: int) -> float | None:
    return (
        None
        if windows is None
        else round(perplexity(model, windows, batch_size=batch_size)["perplexity"], 4)
    )


@register(DSFormerConfig)
def apply(model: nn.Module, config: DSFormerConfig, ctx: Context) -> StageResult:
    """Factor every targeted linear into D @ S (init), refine with STF, pack for inference."""
    if config.stf_steps or config.eval_windows:
        require_causal_lm(model, "dsformer", "STF training and its perplexity (`stf_steps`, `eval_windows` > 0)")
    selected = select_linears(model, config.targets, config.ignore)
    value_bytes = linear_weight(next(iter(selected.values()))).element_size()
    plan = plan_inner_dims({n: linear_shape(m) for n, m in selected.items()}, config, value_bytes)
    data = config.data or config.calibration
    eval_windows = None
    if config.eval_windows:
        eval_windows = ctx.windows(
            data, split="eval", seq_len=config.seq_len, num_windows=config.eval_windows
        )
    metrics: dict[str, Any] = {"ppl_dense": _eval(model, eval_windows, config.batch_size)}
    teacher = frozen_teacher(model) if config.distill and config.stf_steps else None
    rows: dict[str, dict] = {}
    notes = _initialise(model, selected, plan, config, ctx, rows)
    pattern = parse_pattern(config.pattern, config.density)
    if config.k is None and pattern.structured:
        notes.append(
            f"k solved per layer from `keep_bytes`={config.keep_bytes} as the largest multiple of "
            f"M={pattern.m} whose bytes fit (rounded down; see the per-module `k`)"
        )
    metrics["ppl_init"] = _eval(model, eval_windows, config.batch_size)
    curves = _stf(model, config, ctx, data, teacher, metrics) if config.stf_steps else {}
    if config.stf_steps:
        metrics["ppl_stf"] = _eval(model, eval_windows, config.batch_size)
    metrics.update(_totals(rows.values(), value_bytes))
    return StageResult(
        metrics={k: v for k, v in metrics.items() if v is not None},
        per_module=list(rows.values()),
        notes=notes,
        curves=curves,
    )


def _stf(model, config: DSFormerConfig, ctx: Context, data: str, teacher, metrics: dict) -> dict:
    """Straight-Through Factorizer on the `train` split, then pack every trained layer."""
    windows = ctx.windows(
        data,
        split="train",
        seq_len=config.seq_len,
        num_windows=config.stf_steps * config.batch_size,
    )
    curves = train_stf(
        model,
        windows,
        ctx,
        steps=config.stf_steps,
        lr=config.lr,
        batch_size=config.batch_size,
        teacher=teacher,
    )
    pack_trained(model)
    metrics["stf_loss_first"] = round(curves["stf_loss"][0], 4)
    metrics["stf_loss_last"] = round(curves["stf_loss"][-1], 4)
    metrics["stf_support_moved"] = round(curves["stf_support_change"][-1], 4)
    return curves


def _initialise(model, selected, plan, config: DSFormerConfig, ctx: Context, rows) -> list[str]:
    def compress(name: str, module: nn.Module, stats: LayerStats | None) -> nn.Module:
        h = None if stats is None else stats.second_moment()  # X Xᵀ/N as summed
        return _factor_one(name, module, h, plan[name], config, rows)

    # STF trains the new layers: they stay on the execution device
    hooks = CalibrationHooks("hessian", compress, resident=config.stf_steps > 0)
    if config.init == "plain":
        compress_each(model, selected, hooks, ctx, description="dsformer init")
        return []
    windows = ctx.windows(
        config.calibration, split="calib", seq_len=config.seq_len, num_windows=config.num_windows
    )
    outside = compress_blocks(
        model, selected, hooks, windows, ctx, batch_size=config.batch_size, description="dsformer init"
    ).outside
    if not outside:
        return []
    return [
        (
            f"{len(outside)} linear(s) outside the transformer blocks were fitted on the plain "
            f"objective (no calibration statistics): {', '.join(outside[:4])}"
        )
    ]


def pack_trained(model: nn.Module) -> int:
    """Swap every STF training module for its packed DenseSparseLinear; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, DenseSparseTrainable):
            with torch.no_grad():
                s = module.sparse_factor().detach()
            packed = DenseSparseLinear.from_factors(
                module.d.detach(), s, module.pattern, module.bias
            )
            replace_module(model, name, packed)
            count += 1
    return count


def unpack_for_training(model: nn.Module) -> int:
    """Swap every N:M DenseSparseLinear for a trainable module (to run more STF on a packed model)."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, DenseSparseLinear) and module.m:
            pattern = SparsePattern(module.n, module.m)
            with torch.no_grad():
                layer = DenseSparseTrainable(module.d, module.sparse_factor(), module.bias, pattern)
            replace_module(model, name, layer)
            count += 1
    return count


def _totals(rows, value_bytes: int) -> dict[str, Any]:
    rows = list(rows)
    dense = sum(int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    return {
        "layers": len(rows),
        "params_dense": dense,
        "params_kept": sum(r["params"] for r in rows),
        "dense_bytes": dense * value_bytes,
        "stored_bytes": stored,
        "keep_ratio_bytes": round(stored / max(dense * value_bytes, 1), 4),
        "mean_fit_error": round(sum(r["fit_error"] for r in rows) / max(len(rows), 1), 5),
    }

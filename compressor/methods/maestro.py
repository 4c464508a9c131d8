"""maestro: trainable low-rank factors with ordered dropout; learned ranks, truncatable to any budget.

Horvath et al., "Maestro: Uncovering Low-Rank Structures via Trainable Decomposition", ICML 2024,
arXiv 2308.14929; reference code SamuelHorvath/Maestro-LoD.

Each targeted W (out, in) becomes U V, initialised from the SVD (`init: svd`, U = U_svd sqrt(S),
V = sqrt(S) V_svd^T) or from the whitened SVD of W L with H = X X^T = L L^T (`init: whitened`), at
full inner rank min(out, in) (or `init_rank` of it), so the model starts exactly where it was.
Training (see _maestro_train.py) makes the rank ORDER meaningful: each step truncates one sampled
layer to a sampled width (ordered dropout), distils it from the full pass, and the hierarchical
group lasso pushes trailing ranks to zero; after every epoch ranks whose importance
||v_i:||_h * ||u_:i||_h falls below `threshold` are cut (progressive shrinking).

Output: LowRankLinear layers at the learned ranks (or a layer back to dense when (m+n) r >= m n),
reloadable with compressor.load. Because the factors are ordered, a trained run can be truncated
to any budget afterwards without retraining: `compressor compress --method maestro
--from-trained DIR --rank R` keeps each layer's first rank and admits further ranks in globally
decreasing relative importance (importance_i / importance_0, see `allocate_ranks`) until R * dense
parameters are used. Every run reports the accuracy-size curve (perplexity at `curve_keeps`).
`rank` is a KEEP ratio of the targeted linears' parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..calibration import CalibrationHooks, LayerStats, compress_blocks, compress_each
from ..configs.maestro import MaestroConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..evaluation import perplexity
from ..layers import LowRankLinear, dense_linear
from ..models import require_causal_lm
from ..registry import register
from ..report.records import StageResult
from ..targeting import layer_type, linear_weight, replace_module, select_linears
from ._maestro_layer import (
    MaestroLinear,
    allocate_ranks,
    dense_is_smaller,
    lowrank_params,
    ordered_factors,
    output_metric_scale,
)
from ._maestro_train import MaestroSchedule, train_maestro

__all__ = ["MaestroConfig", "MaestroLinear"]


# -- building the ordered layers ---------------------------------------------------------------


def _maestro_layer(module: nn.Module, h, init_rank: float, importance: str) -> MaestroLinear:
    weight = linear_weight(module).detach()
    rank = max(1, round(init_rank * min(weight.shape)))
    u, v = ordered_factors(weight, h, rank)
    scale = output_metric_scale(v, h) if h is not None and importance == "output" else None
    return MaestroLinear(
        u.to(weight.dtype), v.to(weight.dtype), getattr(module, "bias", None), scale
    )


def _install_initial(
    model: nn.Module, selected: dict, config: MaestroConfig, ctx: Context
) -> list[str]:
    """Swap every selected linear for a MaestroLinear (whitened init uses calibration statistics)."""

    def compress(name: str, module: nn.Module, stats: LayerStats | None) -> MaestroLinear:
        h = None if stats is None else stats.second_moment()  # X Xᵀ/N as summed
        return _maestro_layer(module, h, config.init_rank, config.importance)

    # trained and materialised in place afterwards: the layers stay on the execution device
    hooks = CalibrationHooks("hessian", compress, resident=True)
    if config.init == "svd":
        compress_each(model, selected, hooks, ctx, description="maestro init")
        return []
    windows = ctx.windows(
        config.calibration or config.data,
        split="calib",
        seq_len=config.seq_len,
        num_windows=config.num_windows,
    )
    outside = compress_blocks(
        model, selected, hooks, windows, ctx, batch_size=config.batch_size, description="maestro init"
    ).outside
    return (
        [f"no calibration statistics for {', '.join(outside[:4])}: plain SVD init"]
        if outside
        else []
    )


FACTORS_FILE = "maestro/ordered_factors.safetensors"  # a subfolder: checkpoints load every top-level *.safetensors


def _save_ordered_factors(layers: dict[str, MaestroLinear], ctx: Context) -> dict[str, str]:
    """Keep every layer's trained ordered factors (active ranks) beside the checkpoint.

    The checkpoint holds layers materialised at one budget (dense where that is smaller); this
    file keeps the full ordered factors so `from_trained` can truncate the run to any budget later.
    """
    if ctx.out_dir is None:
        return {}
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in layers.items():
        u, v = layer.factors()
        tensors[f"{name}.u"], tensors[f"{name}.v"] = u.contiguous(), v.contiguous()
        if layer.v_scale is not None:
            tensors[f"{name}.v_scale"] = layer.v_scale[: layer.rank].contiguous()
    path = ctx.out_dir / FACTORS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return {"maestro_ordered_factors": FACTORS_FILE}


def _trained_factors(name: str, module: nn.Module, saved: dict) -> tuple | None:
    """Ordered (u, v, v_scale or None) of one layer of a trained run: the saved factors, else a
    LowRankLinear's."""
    if f"{name}.u" in saved:
        return saved[f"{name}.u"], saved[f"{name}.v"], saved.get(f"{name}.v_scale")
    if isinstance(module, LowRankLinear):
        return module.u.detach(), module.v.detach(), None
    return None


def _install_trained(model: nn.Module, selected: dict, folder: str) -> list[str]:
    """Wrap a trained run's ordered factors as MaestroLinear layers in `model`."""
    from safetensors.torch import load_file

    from ..models import load

    trained = dict(load(folder).named_modules())
    factors_path = Path(folder) / FACTORS_FILE
    saved = load_file(str(factors_path)) if factors_path.is_file() else {}
    missing = [name for name in selected if name not in trained]
    if missing:
        raise ConfigError(
            f"maestro: `from_trained` checkpoint {folder!r} has no layer {missing[0]} "
            f"({len(missing)} missing); pass the same model and targets as the training run"
        )
    unordered = []
    for name in selected:
        module = trained[name]
        factors = _trained_factors(name, module, saved)
        if factors is None:  # dense in the run and no saved factors: its SVD is the natural order
            unordered.append(name)
            weight = linear_weight(module)
            factors = (*(t.to(weight.dtype) for t in ordered_factors(weight)), None)
        u, v, scale = factors
        replace_module(model, name, MaestroLinear(u, v, getattr(module, "bias", None), scale))
    if not unordered:
        return []
    return [
        (
            f"{len(unordered)} layer(s) had no trained factors in {folder!r} (dense, and no "
            f"{FACTORS_FILE}) and are ordered by their SVD: {', '.join(unordered[:4])}"
        )
    ]


# -- budgets, curve and materialisation ------------------------------------------------------


def _budget_ranks(layers: dict[str, MaestroLinear], keep: float) -> dict[str, int]:
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    budget = keep * sum(o * i for o, i in shapes.values())
    return allocate_ranks({n: m.importance()[: m.rank] for n, m in layers.items()}, shapes, budget)


@torch.no_grad()
def _curve(
    model: nn.Module, layers: dict[str, MaestroLinear], keeps, windows, batch_size: int
) -> dict[str, list[float]]:
    """Perplexity after truncating the trained model to each keep ratio (no retraining)."""
    curve: dict[str, list[float]] = {"curve_keep": [], "curve_ppl": []}
    dense = sum(m.out_features * m.in_features for m in layers.values())
    for keep in sorted(keeps):
        ranks = _budget_ranks(layers, keep)
        for name, layer in layers.items():
            layer.width = ranks[name]
        try:
            ppl = perplexity(model, windows, batch_size=batch_size)["perplexity"]
        finally:
            for layer in layers.values():
                layer.width = None
        kept = sum(
            lowrank_params(m.out_features, m.in_features, ranks[n]) for n, m in layers.items()
        )
        curve["curve_keep"].append(round(kept / dense, 4))
        curve["curve_ppl"].append(round(ppl, 4))
    return curve


def _materialise(
    model: nn.Module, layers: dict[str, MaestroLinear], ranks: dict[str, int]
) -> list[dict]:
    rows = []
    for name, layer in layers.items():
        rank = max(1, min(ranks[name], layer.rank))
        u, v = layer.factors()
        u, v = u[:, :rank], v[:rank]
        dense = dense_is_smaller(layer.out_features, layer.in_features, rank)
        new = (
            LowRankLinear.from_factors(u, v, layer.bias)
            if not dense
            else dense_linear(u @ v, layer.bias)
        )
        replace_module(model, name, new)
        rows.append(
            {
                "module": name,
                "type": layer_type(name),
                "shape": f"{layer.out_features}x{layer.in_features}",
                "learned_rank": layer.rank,
                "rank": rank,
                "dense": dense,
                "params": lowrank_params(layer.out_features, layer.in_features, rank),
                "importance_last": float(layer.importance()[rank - 1]),
            }
        )
    return rows


@register(MaestroConfig)
def apply(model: nn.Module, config: MaestroConfig, ctx: Context) -> StageResult:
    """Train ordered low-rank factors (or load a trained run) and materialise them at a budget."""
    if not config.from_trained or config.eval_windows:
        require_causal_lm(model, "maestro", "training on the next-token loss (and its perplexity curve)")
    selected = select_linears(model, config.targets, config.ignore)
    eval_windows = None
    if config.eval_windows:
        eval_windows = ctx.windows(
            config.data, split="eval", seq_len=config.seq_len, num_windows=config.eval_windows
        )
    result = StageResult()
    if config.from_trained:
        result.notes = _install_trained(model, selected, config.from_trained)
    else:
        result.notes = _install_initial(model, selected, config, ctx)
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, MaestroLinear) and n in selected
    }
    if not config.from_trained:
        _train(model, layers, config, ctx, result)
        result.artifacts.update(_save_ordered_factors(layers, ctx))
    if eval_windows is not None:
        result.curves.update(
            _curve(model, layers, config.curve_keeps, eval_windows, config.batch_size)
        )
        pairs = zip(result.curves["curve_keep"], result.curves["curve_ppl"], strict=True)
        result.metrics.update({f"ppl@keep={k}": p for k, p in pairs})
    learned = {n: m.rank for n, m in layers.items()}
    ranks = _budget_ranks(layers, config.rank) if config.rank is not None else learned
    result.per_module = _materialise(model, layers, ranks)
    _summarise(model, config, result, learned, eval_windows)
    return result


def _schedule(config: MaestroConfig, seed: int) -> MaestroSchedule:
    return MaestroSchedule(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        gp_lambda=config.gp_lambda,
        threshold=config.threshold,
        full_pass=config.full_pass,
        seed=seed,
    )


def _train(model, layers, config: MaestroConfig, ctx: Context, result: StageResult) -> None:
    if not config.epochs:
        return
    train = ctx.windows(
        config.data, split="train", seq_len=config.seq_len, num_windows=config.train_windows
    )
    history = train_maestro(model, layers, train, ctx, _schedule(config, ctx.seed))
    result.curves.update(
        train_loss=history.loss, group_lasso=history.group_lasso, total_rank=history.total_rank
    )
    result.metrics.update(
        train_loss_first=round(history.loss[0], 4), train_loss_last=round(history.loss[-1], 4)
    )


def _summarise(
    model, config: MaestroConfig, result: StageResult, learned: dict, eval_windows
) -> None:
    rows = result.per_module
    dense = sum(int(r["shape"].split("x")[0]) * int(r["shape"].split("x")[1]) for r in rows)
    kept = sum(r["params"] for r in rows)
    result.metrics.update(
        layers=len(rows),
        params_dense=dense,
        params_kept=kept,
        keep_ratio_reached=round(kept / dense, 4),
        learned_rank_total=sum(learned.values()),
        layers_dense=sum(r["dense"] for r in rows),
    )
    if eval_windows is None:
        return
    if config.rank is not None and config.rank in config.curve_keeps:  # same allocation, measured
        ppl = result.curves["curve_ppl"][sorted(config.curve_keeps).index(config.rank)]
    else:
        ppl = round(perplexity(model, eval_windows, batch_size=config.batch_size)["perplexity"], 4)
    result.metrics["ppl_final"] = ppl

"""KappaTune: fine-tune only the best-conditioned tensors (O. Ludwig, arXiv 2506.16289; peft's
KappaTuneSelector).

κ = σ_max / (σ_min + 1e-8) of each linear weight, in fp32. Low-κ tensors have flatter spectra
and carry less specialised pretrained knowledge, so tuning only them forgets less. Candidates are
the selected linears (lm_head and embeddings excluded) with no dimension above `max_dim`, sorted
by κ ascending and chosen by exactly one rule (`num_modules`, `top_p`, `threshold`: peft's
order). Spectra come from the shared analysis sweep and its on-disk cache, so after
`compressor analyze` (or a first run) the SVDs are skipped.

mode "full": only the selected weights train (the paper's TinyLlama example: AdamW, lr 5e-5).
mode "lora": LoRA (r 16, α 32, dropout 0.05) on the selected modules, via the lora stage's code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..analysis import spectra
from ..analysis.sweep import layer_spectra
from ..configs.kappatune import DEFAULT_TOP_P, KappaTuneConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..registry import register
from ..report.records import StageResult
from ..training import fit
from ..training.data import HEAD_NAME
from ._common import (
    adapter_targets,
    base_weight,
    count_params,
    finish,
    is_quantized,
    param_metrics,
    refuse_compressed,
    refuse_quantized,
    with_default_lr,
    with_layer_type,
)
from ._peft_lora import train_lora


def condition_numbers(model: nn.Module, config: KappaTuneConfig,
                      ctx: Context) -> tuple[dict[str, float], int]:
    """κ of every candidate linear ({name: κ}) and how many spectra came from the cache."""
    modules = adapter_targets(model, config.targets, config.ignore)
    if any(is_quantized(m) for m in modules.values()):
        # peft dequantizes 4/8-bit weights before the SVD; the cache keys on stored bytes: skip it.
        weights = {n: base_weight(m) for n, m in modules.items()}
        return {n: spectra.condition_number(spectra.singular_values(w))
                for n, w in weights.items() if max(w.shape) <= config.max_dim}, 0
    sigma, hits = layer_spectra(model, config.targets, (*config.ignore, HEAD_NAME), ctx=ctx,
                                use_cache=config.use_cache, max_dim=config.max_dim)
    return {n: spectra.condition_number(s) for n, s in sigma.items()}, hits


def select_modules(kappas: dict[str, float], config: KappaTuneConfig) -> list[str]:
    """The lowest-κ names under the configured rule (ascending κ)."""
    return spectra.kappatune_select(kappas, **config.selection_rule())


def _train_full(model: nn.Module, names: list[str], config: KappaTuneConfig,
                ctx: Context) -> StageResult:
    modules = {n: model.get_submodule(n) for n in names}
    refuse_quantized("kappatune", modules,
                     "mode 'full' trains the weights themselves; use mode 'lora'")
    params = {f"{n}.weight": m.weight for n, m in modules.items()}
    result = fit(model, params, config, ctx, method="kappatune")
    return finish(result, metrics=param_metrics(model, count_params(params)))


def _chosen(kappas: dict[str, float], config: KappaTuneConfig) -> list[str]:
    if not kappas:
        raise ConfigError(f"kappatune: no candidate linear has every dimension <= `max_dim` "
                          f"({config.max_dim}); raise `max_dim`")
    chosen = select_modules(kappas, config)
    if not chosen:
        raise ConfigError(f"kappatune: no tensor has κ <= `threshold` ({config.threshold}); "
                          f"the lowest κ is {min(kappas.values()):.4g}: raise `threshold` or use "
                          "`top_p`")
    return chosen


def _selection_metrics(kappas: dict[str, float], chosen: list[str],
                       config: KappaTuneConfig) -> dict[str, Any]:
    unselected = [k for n, k in kappas.items() if n not in set(chosen)]
    rule = {k: v for k, v in config.selection_rule().items() if v is not None}
    return {"mode": config.mode, "candidates": len(kappas), "selected": len(chosen),
            "kappa_max_selected": max(kappas[n] for n in chosen),
            "kappa_min_unselected": min(unselected, default=float("nan")), **rule}


@register(KappaTuneConfig)
def apply(model: nn.Module, config: KappaTuneConfig, ctx: Context) -> StageResult:
    """Select the lowest-κ linears, then tune them (full) or a LoRA on them."""
    full = config.mode == "full"
    config = with_default_lr(config, adamw=5e-5 if full else 2e-4, mezo=1e-6 if full else 5e-5)
    kappas, hits = condition_numbers(model, config, ctx)
    chosen = _chosen(kappas, config)
    refuse_compressed("kappatune", {n: model.get_submodule(n) for n in chosen})
    if full:
        stage = _train_full(model, chosen, config, ctx)
    else:
        stage = train_lora(model, chosen, config, ctx, rank=config.lora_r,
                           alpha=config.lora_alpha, dropout=config.lora_dropout,
                           merge=config.merge, method="kappatune")  # fmt: skip
    # One row per candidate in model order (the analyze stage's order), selected or not.
    stage.per_module = with_layer_type([{"module": n, "kappa": k, "selected": n in chosen}
                                        for n, k in kappas.items()])
    stage.metrics.update({**_selection_metrics(kappas, chosen, config), "spectra_cache_hits": hits})
    return stage

"""MeZO: memory-efficient zeroth-order SGD (SPSA with the seed trick). Paper: arXiv 2305.17333.

One step, for a fresh seed s and the trainable parameters in a fixed order:
  theta += eps*z; l+ = L(theta); theta -= 2*eps*z; l- = L(theta); theta += eps*z   (restored)
  g = (l+ - l-) / (2*eps)                                                          (a scalar)
  theta <- theta - lr * (g*z + wd*theta)       (wd only on weight matrices: no bias, no norm)
z ~ N(0, I) is never stored: `compressor.kernels.dispatch.mezo_axpy_` regenerates it from (s, offset),
where a tensor's offset is the number of trainable elements before it, so the whole parameter
list reads one noise stream. Losses run under no_grad with the model in eval mode (dropout off),
so memory is that of inference plus one chunk of noise.

The run is fully described by its log `<out>/mezo_log.jsonl`: a header (method, model, parameter
names, eps, weight decay, a checksum of the initial weights) and one line per step
{step, seed, projected_grad, lr}. `resume` replays the log onto the initial weights, repeating
each step's perturb/restore arithmetic so the replayed weights equal the original run's bit for
bit. The same property lets several workers share one model: each worker computes g on its own
batch with its own seed and broadcasts the (seed, g, lr) triple (a few bytes); every worker then
applies all triples in the same order with `mezo_update_`, and all copies stay identical without
ever exchanging a gradient or a weight. Under `accelerate launch` / `torchrun` this trainer does
the synchronous form: every rank perturbs with the step's seed, computes g on its own shard of
the data, and the ranks average g (one scalar all-reduce) before the identical update.

Layout: this module is the `mezo` stage (config and apply, above `fit`); the optimizer it and
`fit(optimizer="mezo")` run is compressor.training.mezo_optimizer (below `fit`).
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.configs.mezo import MezoConfig  # noqa: F401  (the config, declared there; re-exported)
from compressor.registry import register
from compressor.report.records import StageResult
from compressor.training.mezo_optimizer import LOG_NAME
from compressor.training.trainer import fit, trainable_for_targets

DEFAULT_LORA_LR = 5e-5  # MeZO paper, LoRA mode (with mezo_eps 1e-2)


# -- the `mezo` stage -------------------------------------------------------------------------


def _train_lora(model: nn.Module, config: MezoConfig, ctx) -> StageResult:
    """MeZO on LoRA adapters via the `lora` stage's own injection, so the result saves and reloads
    exactly like a `lora` run (peft adapter folder + LoraLinear layers)."""
    from compressor.adapters._peft_lora import train_lora
    from compressor.targeting import select_linears

    names = list(select_linears(model, config.targets, config.ignore))
    # LoRA's random A must be the same in a run and in its resume, or the log cannot replay.
    torch.manual_seed(config.seed if config.seed is not None else int(getattr(ctx, "seed", 0) or 0))
    config = config if config.lr is not None else config.replace(lr=DEFAULT_LORA_LR)
    return train_lora(
        model, names, config, ctx, rank=config.lora_r, alpha=config.lora_alpha, dropout=0.0,
        merge=False, method="mezo",
    )  # fmt: skip


@register(MezoConfig)
def apply(model: nn.Module, config: MezoConfig, ctx) -> StageResult:
    """Fine-tune `model` in place with MeZO (full weights, targeted linears, or LoRA adapters)."""
    if config.adapter == "lora":
        stage = _train_lora(model, config, ctx)
    else:
        stage = fit(
            model, trainable_for_targets(model, config), config, ctx, method="mezo"
        ).stage_result()
    stage.metrics.update({"mezo_eps": config.mezo_eps, "adapter": config.adapter or "none"})
    if getattr(ctx, "out_dir", None) is not None:
        stage.artifacts["mezo_log"] = LOG_NAME
    return stage

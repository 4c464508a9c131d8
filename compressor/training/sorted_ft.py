"""Sorted Fine-Tuning (SoFT / Sorted LLaMA): train every depth sub-model at once. arXiv 2309.08968.

Sub-model n = the first n decoder blocks + the SHARED final norm + the SHARED LM head (no new
heads). The loss of a batch is  L = sum over exits n of CE(head(norm(h_n)), next tokens),  with
all exits read from ONE forward pass (h_n = hidden state after block n), so training costs about
what plain fine-tuning costs. Afterwards any prefix of the network is a usable smaller model:
`compressor eval --exit-layer n` (evaluation.exit_logits) reads the same sub-model.

Default exits (the paper's 40-layer LLaMA-2-13B used eight sub-models, presumably 12, 16, ..., 40):
from about 30 % of the depth up to the last layer, spaced by about a tenth of the depth,
  default_exits(L) = range(max(1, round(0.3 L)), L + 1, max(1, round(L / 10)))  plus L itself.
For the 5-layer stories260K that is [2, 3, 4, 5]; for 30-layer SmolLM2 [9, 12, ..., 30]; for
40 layers [12, 16, ..., 40].
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from compressor.calibration import transformer_blocks
from compressor.configs.sorted_ft import WEIGHTINGS, SortedConfig  # noqa: F401  (the config, declared there; re-exported)
from compressor.errors import ConfigError
from compressor.evaluation import final_norm_and_head, num_layers, perplexity
from compressor.registry import register
from compressor.report.records import StageResult
from compressor.training.data import build_task_data
from compressor.training.losses import next_token_loss
from compressor.training.trainer import fit, trainable_for_targets


def default_exits(total_layers: int) -> list[int]:
    """Exits from ~30 % of the depth, every ~10 % of the depth, always ending at the full model."""
    start, spacing = max(1, round(0.3 * total_layers)), max(1, round(total_layers / 10))
    return sorted(set(range(start, total_layers + 1, spacing)) | {total_layers})


def resolve_exits(model: nn.Module, exits: tuple[int, ...]) -> list[int]:
    total = num_layers(model)
    chosen = sorted(set(exits) | {total}) if exits else default_exits(total)
    if chosen[-1] > total:
        raise ConfigError(
            f"sorted: `exits` {list(exits)} exceed the model's {total} layers; use values in 1..{total}"
        )
    return chosen


def exit_losses(model: nn.Module, input_ids: Tensor, exits: list[int]) -> dict[int, Tensor]:
    """Next-token CE of every sub-model, all from one forward pass. input_ids (B, T)."""
    total = num_layers(model)
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    norm, head = final_norm_and_head(model)
    losses = {}
    for n in exits:
        # hidden_states[n] is block n's output; the last entry is already normed: use the logits.
        logits = out.logits if n == total else head(norm(out.hidden_states[n]))  # (B, T, V)
        losses[n] = next_token_loss(logits, input_ids)
    return losses


def sorted_loss(model: nn.Module, batch: dict, exits: list[int], weighting: str = "sum") -> Tensor:
    """The Sorted FT objective: sum (or mean) of the per-exit next-token losses."""
    total = torch.stack(list(exit_losses(model, batch["input_ids"], exits).values())).sum()
    return total / len(exits) if weighting == "mean" else total


@contextlib.contextmanager
def truncated(model: nn.Module, n: int):
    """Temporarily keep only the first `n` blocks (the explicit sub-model, for checks and export)."""
    name = transformer_blocks(model)[0][0].rsplit(".", 1)[0]  # e.g. "model.layers"
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    full = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(list(full)[:n]))
    try:
        yield model
    finally:
        setattr(parent, attr, full)


def per_exit_perplexity(
    model: nn.Module, windows: Tensor, exits: list[int], batch_size: int
) -> dict[str, float]:
    """{"perplexity_exit<n>": ...} on held-out windows (N, T) for every exit."""
    return {
        f"perplexity_exit{n}": perplexity(model, windows, batch_size=batch_size, exit_layer=n)[
            "perplexity"
        ]
        for n in exits
    }


@register(SortedConfig)
def apply(model: nn.Module, config: SortedConfig, ctx) -> StageResult:
    """Sorted fine-tuning of `model` in place; metrics include every exit's perplexity."""
    exits = resolve_exits(model, config.exits)
    data = build_task_data(config, ctx, model)
    windows = data.eval["input_ids"]

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return per_exit_perplexity(m, windows, exits, config.batch_size)

    result = fit(
        model, trainable_for_targets(model, config), config, ctx, data=data, method="sorted",
        loss_fn=lambda m, batch: sorted_loss(m, batch, exits, config.exit_weighting), eval_fn=eval_fn,
    )  # fmt: skip
    total = num_layers(model)
    notes = [f"exits {exits} of {total} layers; `compressor eval --exit-layer n` reads sub-model n"]
    return result.stage_result(metrics={"exits": ",".join(map(str, exits))}, notes=notes)

"""rtn: round-to-nearest weight-only quantization, the data-free baseline of `gptq`.

Every weight goes to the nearest point of its group's grid (METHODS.md §17.1; the grid, scales and
zero points are `_quant_grid`'s, shared with gptq), with no calibration and no error feedback.
Each targeted linear becomes a `QuantLinear` holding the packed b-bit codes and the group scales;
a low-rank layer's two factors are both quantized (`QuantLowRankLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..calibration import CalibrationHooks, LayerStats, compress_each
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ..targeting import select_linears
from ._quant_grid import QuantFields, check_embedding, check_targets, quantize_embedding, round_to_nearest, summary


@dataclass(frozen=True, kw_only=True)
class RTNConfig(QuantFields):
    """Round-to-nearest weight-only quantization (see QuantFields for bits, group_size, symmetric)."""


@register("rtn", RTNConfig, kind="compress")
def apply(model: nn.Module, config: RTNConfig, ctx: Context) -> StageResult:
    """Replace every targeted linear by its round-to-nearest QuantLinear (no calibration), and the
    input embedding (with a tied lm_head) when `embedding_bits` asks."""
    selected = select_linears(model, config.targets, config.ignore)
    check_targets("rtn", selected, config.group_size)
    embedding = check_embedding("rtn", model, config)
    rows: list[dict[str, Any]] = []
    if embedding is not None:
        quantize_embedding(model, embedding, config, set(selected), rows)

    def compress(name: str, module: nn.Module, stats: LayerStats | None) -> nn.Module:
        return round_to_nearest(name, module, config, rows)

    compress_each(model, selected, CalibrationHooks(None, compress), ctx, description="rtn")
    return StageResult(metrics=summary(rows), per_module=rows)

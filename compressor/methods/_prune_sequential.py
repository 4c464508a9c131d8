"""Sequential (block-by-block) calibration driver shared by prune (Wanda), dsformer and maestro.

Each transformer block's targeted linears are replaced using statistics of the inputs they see in
the *already compressed* model: capture the first block's inputs, then per block accumulate the
statistics of its linears, call `replace`, and feed the compressed block's outputs to the next.
Inside a block the linears reading the block input (q, k, v, gate, up) go first and the ones in
`second_phase` (o, down: their inputs come from the first phase) are calibrated afterwards on the
compressed first phase, as the low-rank family does (compressor/methods/lowrank.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..calibration import (
    block_linears,
    capture_block_inputs,
    capture_linear_inputs,
    run_block,
    transformer_blocks,
)
from ..context import Context
from ..targeting import replace_module
from .lowrank import DEFAULT_SECOND_PHASE, split_phases

# replace(name, module, stat) -> the new module (installed by the driver), or None to keep it.
Replace = Callable[[str, nn.Module, Tensor | None], nn.Module | None]


def input_statistics(
    linears: dict[str, nn.Module], block: nn.Module, inputs, kind: str
) -> dict[str, Tensor]:
    """Per linear: H = X X^T / N (in, in) if kind == "gram", else ||X_j||_2^2 / N (in,) ("sq_norm").

    Products run in fp32 per batch and are summed in fp64.
    """
    sums: dict[str, Tensor] = {}
    tokens: dict[str, int] = {}

    def add(name: str, x: Tensor) -> None:
        stat = (x.T @ x if kind == "gram" else x.square().sum(0)).double()
        sums[name] = sums[name] + stat if name in sums else stat
        tokens[name] = tokens.get(name, 0) + x.shape[0]

    with capture_linear_inputs(linears, add):
        run_block(block, inputs)
    return {name: total / max(tokens[name], 1) for name, total in sums.items()}


@torch.no_grad()
def compress_sequentially(
    model: nn.Module,
    selected: dict[str, nn.Module],
    windows: Tensor,
    replace: Replace,
    ctx: Context,
    *,
    kind: str = "gram",
    batch_size: int = 8,
    second_phase: tuple[str, ...] = DEFAULT_SECOND_PHASE,
    description: str = "calibrating",
) -> list[str]:
    """Replace every selected linear, block by block, from its calibration statistics.

    Returns the names of selected linears outside the transformer blocks (e.g. an explicitly
    targeted lm_head): they got `replace(name, module, None)`, i.e. no statistics.
    """
    blocks = transformer_blocks(model)
    inputs = capture_block_inputs(model, windows, batch_size=batch_size)
    done: set[str] = set()
    for block_name, block in ctx.progress(blocks, description=description):
        for phase in split_phases(block_linears(block, block_name, selected), second_phase):
            stats = input_statistics(phase, block, inputs, kind)
            for name, module in phase.items():
                _install(model, name, replace(name, module, stats.get(name)))
                done.add(name)
        inputs = run_block(block, inputs)
    outside = [name for name in selected if name not in done]
    for name in outside:
        _install(model, name, replace(name, selected[name], None))
    return outside


def _install(model: nn.Module, name: str, new: nn.Module | None) -> None:
    if new is not None:
        replace_module(model, name, new)

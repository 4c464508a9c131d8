"""Primitives of block-by-block calibration: find the transformer blocks, capture the first
block's inputs (hidden states + the arguments the model passes to every block, e.g. rotary
embeddings and the attention mask), replay a block batch by batch, hook its linears' inputs.
compressor/calibration/engine.py builds the sequential loop from these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..offload import input_device
from ..targeting import find_linears, is_linear


@dataclass
class BlockInputs:
    """Per batch: hidden states (B, T, d) and the positional/keyword args every block receives."""

    hidden: list[torch.Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.args, self.kwargs)

    def clone(self) -> BlockInputs:
        return self.with_hidden([h.clone() for h in self.hidden])


class _StopForward(Exception):
    """Raised by the capture hook so the model does not run past the first block."""


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks: the nn.ModuleList holding the most linears (Llama `model.layers`,
    BERT `encoder.layer`, GPT-2 `transformer.h`, ...)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(1 for m in module.modules() if is_linear(m))
            if count > best_count and all(any(is_linear(m) for m in b.modules()) for b in module):
                best, best_count = (name, module), count
    if best is None:
        raise ConfigError("found no repeated transformer blocks (nn.ModuleList of layers) in this model; "
                          "block-by-block calibration needs a transformer")
    prefix, blocks = best
    return [(f"{prefix}.{i}", block) for i, block in enumerate(blocks)]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                         device: torch.device | str | None = None) -> BlockInputs:
    """Run the model up to its first block on `windows` (N, T) and record that block's inputs."""
    if windows.numel() == 0 or windows.shape[0] == 0:
        raise DataError("calibration set is empty; pass more text or more windows")
    first = transformer_blocks(model)[0][1]
    device = torch.device(device) if device is not None else input_device(model)
    captured = BlockInputs(hidden=[])

    def hook(_module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        handle.remove()
    return captured


def forward_batch(block: nn.Module, inputs: BlockInputs, index: int) -> torch.Tensor:
    """Run `block` on batch `index` of `inputs`; returns its hidden-state output (B, T, d)."""
    output = block(inputs.hidden[index], *inputs.args[index], **inputs.kwargs[index])
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Outputs of `block` for every batch, ready to be the next block's inputs."""
    return inputs.with_hidden([forward_batch(block, inputs, i) for i in range(len(inputs))])


def inputs_to(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """BlockInputs with every tensor (hidden, args, kwargs) on `device`."""

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return BlockInputs(
        [h.to(device) for h in inputs.hidden],
        [move(a) for a in inputs.args],
        [{k: move(v) for k, v in kw.items()} for kw in inputs.kwargs],
    )


@contextlib.contextmanager
def capture_linear_inputs(linears: dict[str, nn.Module],
                          callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, every forward of a hooked linear calls callback(name, x) with x the layer's
    input flattened to (tokens, in_features) in fp32."""
    handles = []
    for name, module in linears.items():
        def hook(_module, args, _name=name):
            x = args[0]
            callback(_name, x.reshape(-1, x.shape[-1]).float())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_linears(block: nn.Module, block_name: str, selected: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The selected linears inside one block, keyed by their full model names."""
    inside = {f"{block_name}.{n}": m for n, m in find_linears(block).items()}
    return {n: m for n, m in inside.items() if n in selected}

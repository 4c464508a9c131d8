"""The sequential calibration engine: one block-by-block loop for every calibrated method.

A method supplies two hooks (CalibrationHooks): which statistics of its linears' inputs it needs
(`stats`, a LayerStats kind) and its per-layer step `compress(name, module, stats)` returning the
replacement module (or None: keep `module`). `compress_blocks` then

1. captures the first block's inputs on the calibration windows (only one block's activations are
   alive at a time);
2. per block, in two phases — the linears reading the block input (q, k, v, gate, up) first,
   then those in `second_phase` (o, down), whose inputs come from the first phase — replays the
   block over every batch with the phase's linears hooked, accumulates their statistics (linears
   reading the same tensor share one accumulator) and calls `compress` on each, so the second
   phase is calibrated on the compressed first phase;
3. feeds the COMPRESSED block's outputs to the next block, so every layer sees the error its
   upstream compression introduced. With `hessian+cross` statistics a teacher stream runs in
   parallel: a copy of each original block, fed the teacher's own hidden states, gives the
   full-precision inputs X_f of the same tokens;
4. gives the linears outside every block (e.g. an explicitly targeted lm_head) `stats=None`.

`calibrated_phases` is that loop with any per-phase step `each_phase(linears, statistics)`, for a
pass that reads statistics without compressing (the dense first pass of `allocation: aware`); it
returns what it measured (CalibrationSummary), as `compress_blocks` does.

Offload: the model may live on the CPU while each block is moved to `ctx.device` for its passes,
or be dispatched by accelerate (CPU/disk offload: compressor/offload.py), where the hooks place
each block; `compress` always sees real weights, and its result is placed where the original
lived. `compress_each` is the data-free version of the per-layer step (svd, welore, magnitude
pruning, plain inits), with the same offload handling.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import DEFAULT_SECOND_PHASE, CalibrationConfig
from ..context import Context
from ..data import MIN_CALIBRATION_WINDOWS
from ..errors import DataError
from ..offload import (
    execution_device,
    has_offloaded_weights,
    is_dispatched,
    materialized,
    place_like,
    standalone_copy,
)
from ..targeting import matches, replace_module
from .blocks import (
    BlockInputs,
    block_linears,
    capture_block_inputs,
    capture_linear_inputs,
    forward_batch,
    inputs_to,
    run_block,
    transformer_blocks,
)
from .stats import LayerStats, StatsCollector

# compress(name, module, stats or None) -> the replacement module, or None to keep `module`.
CompressStep = Callable[[str, nn.Module, "LayerStats | None"], "nn.Module | None"]
# each_phase({name: module}, {name: LayerStats}): what a block loop does with one phase's linears.
PhaseStep = Callable[[dict[str, nn.Module], dict[str, LayerStats]], None]


@dataclass(frozen=True)
class CalibrationHooks:
    """What a calibrated method plugs into the engine.

    stats: the LayerStats kind its step reads (`abs_mean`, `sq_norm`, `hessian`,
        `hessian+cross`); None for a data-free step (`compress_each` only).
    compress: the per-layer step. It may read `module`'s weights (real values even when offloaded)
        and returns the new module, which the engine installs and places.
    in_place: the step may instead write into `module`'s weights and return None (unstructured
        pruning). An offloaded module's weights are reloaded from the offload store on every
        forward, so the step then gets a hook-free copy, which is installed in its place.
    resident: the new modules are used directly afterwards (trained by dsformer's STF and
        maestro, read by maestro's materialisation): they stay resident on the execution device
        instead of being offloaded like their source, because an offloading hook swaps a module's
        parameters on every forward (an optimizer holding the old ones would train nothing).
    """

    stats: str | None
    compress: CompressStep
    in_place: bool = False
    resident: bool = False


@dataclass(frozen=True)
class CalibrationSummary:
    """What a block loop measured, and the linears it found outside every block."""

    metrics: dict[str, float] = field(default_factory=dict)
    outside: list[str] = field(default_factory=list)


@torch.no_grad()
def compress_blocks(
    model: nn.Module,
    linears: dict[str, nn.Module],
    hooks: CalibrationHooks,
    windows: Tensor,
    ctx: Context,
    *,
    batch_size: int = 8,
    second_phase: tuple[str, ...] = DEFAULT_SECOND_PHASE,
    description: str = "calibrating",
) -> CalibrationSummary:
    """Compress every linear of `linears` ({full name: module}) block by block from statistics of
    its inputs on `windows` (N, T) in the already-compressed model; see the module docstring.

    Metrics: calibration_windows, calibration_tokens, activation_memory_mb (one block's inputs,
    both streams) and stats_memory_mb (the largest phase's statistics)."""

    def compress_phase(phase: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
        for name, module in phase.items():
            compress_layer(model, name, module, stats[name], hooks)

    summary = calibrated_phases(
        model, linears, hooks.stats, windows, ctx, compress_phase,
        batch_size=batch_size, second_phase=second_phase, description=description,
    )
    for name in summary.outside:
        compress_layer(model, name, linears[name], None, hooks)
    return summary


def calibrated_phases(
    model: nn.Module,
    linears: dict[str, nn.Module],
    kind: str,
    windows: Tensor,
    ctx: Context,
    each_phase: PhaseStep,
    *,
    batch_size: int = 8,
    second_phase: tuple[str, ...] = DEFAULT_SECOND_PHASE,
    description: str = "calibrating",
) -> CalibrationSummary:
    """The block loop: calls `each_phase({name: module}, {name: LayerStats})` per phase of each
    block, with the block on the calibration device; what it does to those linears is what the
    next phase and the next block are calibrated on. Returns the metrics (see `compress_blocks`)
    and `outside`, the linears in no block."""
    device = ctx.device
    dispatched = is_dispatched(model)
    home = device if dispatched else execution_device(model)
    student = inputs_to(capture_block_inputs(model, windows, batch_size, home), device)
    teacher = student if kind == "hessian+cross" else None
    metrics = {
        "calibration_windows": windows.shape[0],
        "calibration_tokens": student.num_tokens(),
        "activation_memory_mb": _inputs_bytes(student) * (2 if teacher is not None else 1) / 2**20,
    }
    seen: set[str] = set()
    stats_bytes = 0
    for block_name, block in ctx.progress(transformer_blocks(model), description):
        with _on_device(block, device, home, dispatched):
            inside = block_linears(block, block_name, linears)
            seen.update(inside)
            original = standalone_copy(block) if teacher is not None and inside else None
            phases = split_phases(inside, second_phase)
            teacher_next: list[Tensor] | None = [] if original is not None else None
            for i, phase in enumerate(phases):
                keep = teacher_next if i == len(phases) - 1 else None
                stats = collect_stats(block, block_name, phase, student, kind, original, teacher, keep)
                unique = {id(s): s for s in stats.values()}.values()
                stats_bytes = max(stats_bytes, sum(s.nbytes() for s in unique))
                each_phase(phase, stats)
            next_student = run_block(block, student)
            if teacher is not None:
                teacher = _next_teacher(block, teacher, student, next_student, teacher_next)
            student = next_student
    metrics["stats_memory_mb"] = stats_bytes / 2**20
    return CalibrationSummary(metrics, [name for name in linears if name not in seen])


@torch.no_grad()
def compress_each(
    model: nn.Module,
    linears: dict[str, nn.Module],
    hooks: CalibrationHooks,
    ctx: Context,
    description: str,
) -> None:
    """The data-free loop: `hooks.compress(name, module, None)` on every linear, offload-aware."""
    for name, module in ctx.progress(list(linears.items()), description=description):
        compress_layer(model, name, module, None, hooks)


def compress_layer(
    model: nn.Module,
    name: str,
    module: nn.Module,
    stats: LayerStats | None,
    hooks: CalibrationHooks,
) -> None:
    """One per-layer step: real weights in, the replacement installed where `module` lived."""
    if hooks.in_place and has_offloaded_weights(module):
        copy = standalone_copy(module)
        new = hooks.compress(name, copy, stats)
        new = copy if new is None else new
    else:
        with materialized(module):  # offloaded weights are meta at rest
            new = hooks.compress(name, module, stats)
    if new is None:
        return
    placed = new.to(execution_device(module)) if hooks.resident else place_like(new, module)
    replace_module(model, name, placed)


def outside_blocks(model: nn.Module, names) -> list[str]:
    """Those of `names` outside every transformer block (they get no calibration inputs)."""
    prefixes = tuple(f"{name}." for name, _ in transformer_blocks(model))
    return [name for name in names if not name.startswith(prefixes)]


def split_phases(
    linears: dict[str, nn.Module], second_phase: tuple[str, ...]
) -> list[dict[str, nn.Module]]:
    """[first phase, second phase] (empty phases dropped): `second_phase` names read the outputs of
    the block's other linears, so they are calibrated after those are compressed."""
    second = {n: m for n, m in linears.items() if any(matches(n, p) for p in second_phase)}
    first = {n: m for n, m in linears.items() if n not in second}
    return [phase for phase in (first, second) if phase]


def collect_stats(
    block: nn.Module,
    block_name: str,
    phase: dict[str, nn.Module],
    student: BlockInputs,
    kind: str,
    original: nn.Module | None = None,
    teacher: BlockInputs | None = None,
    teacher_outputs: list[Tensor] | None = None,
) -> dict[str, LayerStats]:
    """Statistics of the `phase` linears' inputs over every calibration batch.

    For `hessian+cross` each batch first runs the `original` (uncompressed) block on the teacher's
    hidden states, keeping that batch's teacher inputs, then the current block on the student's, so
    X_f Xᵀ pairs the same tokens; the teacher block's outputs are appended to `teacher_outputs`
    when given (they are the next block's teacher inputs, so no extra pass is needed).
    Linears fed the same tensor (q/k/v, gate/up) share one LayerStats.
    """
    collector = StatsCollector(kind)
    offset = len(block_name) + 1
    for index in range(len(student)):
        collector.start_batch(first=index == 0)
        if kind == "hessian+cross":
            twins = {n: original.get_submodule(n[offset:]) for n in phase}
            with capture_linear_inputs(twins, collector.teacher_x.__setitem__):
                output = forward_batch(original, teacher, index)
            if teacher_outputs is not None:
                teacher_outputs.append(output)
        with capture_linear_inputs(phase, collector.add):
            forward_batch(block, student, index)
    return collector.result()


def calibration_windows(config: CalibrationConfig, ctx: Context) -> tuple[Tensor, list[str]]:
    """Calibration token windows (N, seq_len) of a calibrated config's `calib` split (its
    `calibration`, `seq_len`, `num_windows`) and the report notes about them: below
    MIN_CALIBRATION_WINDOWS windows it warns, and says so in a note."""
    windows = ctx.windows(
        config.calibration, split="calib", seq_len=config.seq_len, num_windows=config.num_windows
    )
    if windows.shape[0] == 0:
        raise DataError(
            f"{config.method_name}: the calibration set `{config.calibration}` is empty; "
            "pass a text source with at least one window of `seq_len` tokens"
        )
    if windows.shape[0] < MIN_CALIBRATION_WINDOWS:
        message = (
            f"{config.method_name}: only {windows.shape[0]} calibration windows of {config.seq_len} tokens "
            f"(< {MIN_CALIBRATION_WINDOWS}); statistics may be poor — raise `num_windows` or use more text"
        )
        warnings.warn(message, stacklevel=2)
        return windows, [message]
    return windows, []


@contextlib.contextmanager
def _on_device(block: nn.Module, device, home, dispatched: bool):
    """`block` on the calibration device for the duration (accelerate's hooks do it when dispatched)."""
    if dispatched:
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)


def _next_teacher(block, teacher, student, next_student, teacher_next) -> BlockInputs:
    """The teacher stream's inputs for the next block."""
    if teacher_next is not None:  # captured while collecting the last phase's statistics
        return teacher.with_hidden(teacher_next)
    if teacher is student:  # nothing compressed upstream yet: the streams coincide
        return next_student
    return run_block(block, teacher)  # block unchanged (nothing compressed in it): it is the teacher


def _inputs_bytes(inputs: BlockInputs) -> int:
    return sum(h.numel() * h.element_size() for h in inputs.hidden)

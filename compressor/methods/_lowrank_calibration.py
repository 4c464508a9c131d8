"""Calibration plumbing of the low-rank family: per-linear statistics streamed block by block
(with an optional full-precision teacher stream), the two-phase split inside a block, and a
peak-memory meter. The maths that consumes the statistics lives in the method modules."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..calibration import (
    BlockInputs,
    block_linears,
    capture_block_inputs,
    capture_linear_inputs,
    run_block,
    transformer_blocks,
)
from ..context import Context
from ..data import MIN_CALIBRATION_WINDOWS
from ..errors import DataError, ModelError
from ..offload import execution_device, is_dispatched, standalone_copy
from ..targeting import matches


@dataclass
class LayerStats:
    """Calibration statistics of one linear's inputs, accumulated batch by batch.

    tokens: N seen so far. abs_sum (n,): Σ|x_j| (ASVD). gram (n, n): Σ x xᵀ = X Xᵀ.
    cross (n, n): Σ x_f xᵀ = X_f Xᵀ with x_f the teacher's (full-precision model's) input for the
    same token. Each batch product is computed in fp32 (the heavy matmul) and summed across
    batches in fp64 so long calibration runs do not lose precision.
    """

    kind: str
    tokens: int = 0
    abs_sum: Tensor | None = None
    gram: Tensor | None = None
    cross: Tensor | None = None
    extras: dict = field(default_factory=dict)

    def add(self, x: Tensor, x_teacher: Tensor | None = None) -> None:
        """x, x_teacher: (tokens, n) fp32 inputs of the compressed model and of the teacher."""
        x = x.float()
        self.tokens += x.shape[0]
        if self.kind == "abs_mean":
            self.abs_sum = _acc(self.abs_sum, x.abs().sum(0))
            return
        self.gram = _acc(self.gram, x.T @ x)
        if self.kind == "hessian+cross":
            if x_teacher is None or x_teacher.shape != x.shape:
                raise ModelError(
                    "internal: teacher activations missing or misaligned with the student's"
                )
            self.cross = _acc(self.cross, x_teacher.float().T @ x)

    def abs_mean(self) -> Tensor:
        """mean_tokens |x_j| (n,), fp64."""
        return self.abs_sum / max(self.tokens, 1)

    def hessian(self) -> Tensor:
        """H = X Xᵀ / N (n, n), fp64, exactly symmetrised."""
        h = self.gram / max(self.tokens, 1)
        return (h + h.T) / 2

    def teacher_cross(self) -> Tensor:
        """X_f Xᵀ / N (n, n), fp64."""
        return self.cross / max(self.tokens, 1)

    def to(self, device: torch.device | str) -> LayerStats:
        """The same statistics on `device` (factorisation may run elsewhere than calibration)."""
        moved = {
            k: None if t is None else t.to(device)
            for k, t in (("abs_sum", self.abs_sum), ("gram", self.gram), ("cross", self.cross))
        }
        return LayerStats(self.kind, self.tokens, **moved, extras=self.extras)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.abs_sum, self.gram, self.cross)
            if t is not None
        )


def _acc(total: Tensor | None, batch: Tensor) -> Tensor:
    batch = batch.double()
    return batch if total is None else total.add_(batch)


def compress_sequential(run, stats_kind: str) -> None:
    """The block loop of a lowrank._Run: collect statistics phase by phase, `run.compress` each
    linear, propagate the compressed block's outputs (and the teacher's) to the next block.

    Blocks are moved one at a time to `ctx.device` (the model itself may stay on the CPU); on a
    model dispatched by accelerate (CPU/disk offload) the hooks place each block instead."""
    config, model, device = run.config, run.model, run.ctx.device
    windows = calibration_windows(config, run.ctx, run.notes)
    blocks = transformer_blocks(model)
    _keep_out_of_block_dense(run, blocks)
    dispatched = is_dispatched(model)
    home = device if dispatched else execution_device(model)
    student = inputs_to(capture_block_inputs(model, windows, config.batch_size, home), device)
    teacher = student if stats_kind == "hessian+cross" else None
    run.metrics.update(
        calibration_windows=windows.shape[0],
        calibration_tokens=student.num_tokens(),
        activation_memory_mb=_inputs_bytes(student) * (2 if teacher is not None else 1) / 2**20,
    )
    stats_bytes = 0
    for block_name, block in run.ctx.progress(blocks, f"{config.method_name}: blocks"):
        with _on_device(block, device, home, dispatched):
            factored = {
                n: m
                for n, m in block_linears(block, block_name, run.plans).items()
                if run.plans[n].rank
            }
            original = standalone_copy(block) if teacher is not None and factored else None
            phases = split_phases(factored, config.second_phase)
            teacher_next: list[Tensor] | None = [] if original is not None else None
            for i, phase in enumerate(phases):
                keep = teacher_next if i == len(phases) - 1 else None
                stats = collect_stats(
                    block, block_name, phase, student, stats_kind, original, teacher, keep
                )
                unique = {id(s): s for s in stats.values()}.values()
                stats_bytes = max(stats_bytes, sum(s.nbytes() for s in unique))
                for name in phase:
                    run.compress(name, stats[name])
            next_student = run_block(block, student)
            if teacher is not None:
                teacher = _next_teacher(block, teacher, student, next_student, teacher_next)
            student = next_student
    run.metrics["stats_memory_mb"] = stats_bytes / 2**20


@torch.no_grad()  # called before compress_model's no_grad block: without it hooks would keep graphs
def dense_layer_stats(model: nn.Module, selected: dict[str, nn.Module], config, ctx: Context,
                      notes: list[str], consume) -> None:
    """The first pass of `allocation: aware`: stream the DENSE model block by block (nothing is
    compressed yet) and call consume({name: module}, {name: LayerStats}) once per block for its
    selected linears, while that block is on the calibration device. Memory: one block's inputs and the
    Hessians of one block's linears, as in `compress_sequential`."""
    device = ctx.device
    windows = calibration_windows(config, ctx, notes)
    dispatched = is_dispatched(model)
    home = device if dispatched else execution_device(model)
    inputs = inputs_to(capture_block_inputs(model, windows, config.batch_size, home), device)
    for block_name, block in ctx.progress(transformer_blocks(model), f"{config.method_name}: spectra"):
        with _on_device(block, device, home, dispatched):
            linears = block_linears(block, block_name, selected)
            if linears:
                consume(linears, collect_stats(block, block_name, linears, inputs, "hessian"))
            inputs = run_block(block, inputs)


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
    return run_block(block, teacher)  # block unchanged (nothing factored in it): it is the teacher


def _keep_out_of_block_dense(run, blocks: list[tuple[str, nn.Module]]) -> None:
    """Targeted linears outside every block (e.g. BERT's pooler) get no calibration inputs."""
    prefixes = tuple(f"{name}." for name, _ in blocks)
    for name, plan in list(run.plans.items()):
        if plan.rank and not name.startswith(prefixes):
            run.keep_dense(
                name,
                "outside the transformer blocks (no calibration inputs): dense",
                f"{name} is outside the transformer blocks and was kept dense; add it to `ignore`",
            )


def _inputs_bytes(inputs: BlockInputs) -> int:
    return sum(h.numel() * h.element_size() for h in inputs.hidden)


def calibration_windows(config, ctx: Context, notes: list[str]) -> Tensor:
    """Calibration token windows (N, seq_len) of a CalibratedLowRankConfig's `calib` split; warns
    below 64 windows."""
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
        notes.append(message)
    return windows


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
    collector = _StatsCollector(kind)
    offset = len(block_name) + 1
    for index in range(len(student)):
        collector.start_batch(first=index == 0)
        if kind == "hessian+cross":
            twins = {n: original.get_submodule(n[offset:]) for n in phase}
            with capture_linear_inputs(twins, collector.teacher_x.__setitem__):
                output = _forward(original, teacher, index)
            if teacher_outputs is not None:
                teacher_outputs.append(output)
        with capture_linear_inputs(phase, collector.add):
            _forward(block, student, index)
    return collector.result()


class _StatsCollector:
    """Routes hooked inputs into LayerStats; on the first batch it detects linears that read the
    very same tensor (q/k/v, gate/up) and lets them share one accumulator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.stats: dict[str, LayerStats] = {}
        self.alias: dict[str, str] = {}
        self.teacher_x: dict[str, Tensor] = {}
        self.seen: list[tuple[str, Tensor]] | None = None

    def start_batch(self, first: bool) -> None:
        self.teacher_x = {}
        self.seen = [] if first else None

    def add(self, name: str, x: Tensor) -> None:
        if self.seen is not None:
            leader = next(
                (n for n, y in self.seen if y.shape == x.shape and torch.equal(y, x)), None
            )
            if leader is not None:
                self.alias[name] = leader
                return
            self.seen.append((name, x))
            self.stats[name] = LayerStats(self.kind)
        if name not in self.alias:
            self.stats[name].add(x, self.teacher_x.get(name))

    def result(self) -> dict[str, LayerStats]:
        return {**self.stats, **{name: self.stats[leader] for name, leader in self.alias.items()}}


def _forward(block: nn.Module, inputs: BlockInputs, index: int) -> Tensor:
    """Run `block` on batch `index`; returns its hidden-state output (B, T, d)."""
    output = block(inputs.hidden[index], *inputs.args[index], **inputs.kwargs[index])
    return output[0] if isinstance(output, (tuple, list)) else output


def inputs_to(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """BlockInputs with every tensor (hidden, args, kwargs) on `device`."""

    def move(value):
        if isinstance(value, Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return BlockInputs(
        [h.to(device) for h in inputs.hidden],
        [move(a) for a in inputs.args],
        [{k: move(v) for k, v in kw.items()} for kw in inputs.kwargs],
    )

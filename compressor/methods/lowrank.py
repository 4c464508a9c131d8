"""Shared machinery of the training-free low-rank family (svd, asvd, svd-llm, saes-svd, welore).

`rank` is always a KEEP ratio of parameters (METHODS §13.1: every SVD codebase mixes keep and
remove up): a targeted (m, n) linear gets r = ⌊rank·m·n/(m+n)⌋ so its factors U (m, r) and
V (r, n) hold about `rank`·m·n numbers. A layer stays dense when factoring it would not save
parameters (r ≥ min(m, n) or r·(m+n) ≥ m·n) and whenever `rank` = 1, so rank 1 is the identity.

Calibrated methods run sequentially, one transformer block at a time (compressor.calibration):
capture the block's inputs, hook the block's targeted linears to accumulate statistics, compress,
then feed the COMPRESSED block's outputs to the next block, so every layer sees the error its
upstream compression introduced. Inside a block the linears are compressed in two phases — the
ones reading the block input (q, k, v, gate, up) first, then the ones in `second_phase` (o, down)
— so the second phase is calibrated on the compressed first phase's outputs. Methods that need the
full-precision "teacher" inputs X_f as well (saes-svd, the svd-llm update) stream a copy of the
original block in parallel. Peak memory is one block's inputs (student and teacher), one batch of
hooked activations and the statistics of one block's linears; weights may stay on the CPU while
each block is moved to `ctx.device` for its calibration passes.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

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
from ..config import MethodConfig
from ..context import Context
from ..data import MIN_CALIBRATION_WINDOWS
from ..errors import ConfigError, DataError, ModelError
from ..layers import CompressedLinear, LowRankLinear
from ..report.records import StageResult
from ..targeting import linear_shape, linear_weight, matches, replace_module, select_linears

Allocation = Literal["uniform", "welore"]
DEFAULT_SECOND_PHASE = ("o_proj", "down_proj", "out_proj", "output.dense", "fc2", "c_proj", "dense_4h_to_h")


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(MethodConfig):
    """Fields shared by every low-rank method.

    Args:
        rank: KEEP ratio of the targeted linears' parameters, 0 < rank ≤ 1 (0.6 = keep 60 %,
            remove 40 %). Each matrix gets r = ⌊rank·m·n/(m+n)⌋; rank 1 keeps every layer dense.
        allocation: `uniform` (the same keep ratio per matrix) or `welore` (non-uniform ranks from
            each matrix's normalised singular-value tail, one global threshold bisected to hit
            `rank` in parameters; see compressor/methods/welore.py).
        min_ratio: with `welore` allocation, a matrix is factored only when more than this
            fraction of its rank is removed (WeLore's LRC/N-LRC split); others stay dense.
    """

    rank: float = 0.5
    allocation: Allocation = "uniform"
    min_ratio: float = 0.4999

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.method_name or "low-rank"
        if not isinstance(self.rank, (int, float)) or isinstance(self.rank, bool) or not 0 < self.rank <= 1:
            raise ConfigError(
                f"{name}: `rank` is the keep ratio of parameters and must be in (0, 1], got {self.rank!r}; "
                "e.g. `rank: 0.6` keeps 60 % (removes 40 %)"
            )
        if self.allocation not in ("uniform", "welore"):
            raise ConfigError(f"{name}: `allocation` must be `uniform` or `welore`, got {self.allocation!r}")
        if not 0 <= self.min_ratio < 1:
            raise ConfigError(f"{name}: `min_ratio` must be in [0, 1), got {self.min_ratio!r}; WeLore uses 0.4999")


@dataclass(frozen=True, kw_only=True)
class CalibratedLowRankConfig(LowRankConfig):
    """Low-rank fields plus the calibration data of the activation-aware methods.

    Args:
        calibration: text source for calibration windows (`default` = the embedded TinyStories
            excerpt, or a .txt/.jsonl/.csv/.tsv path, or a datasets name); its `calib` split is used,
            which never overlaps the `eval` split used for perplexity.
        num_windows: calibration windows (≥ 64 recommended: 8 windows gave perplexity 4629 in
            SVD-LLM issue #54; fewer than 64 warns).
        seq_len: tokens per calibration window.
        batch_size: windows per forward pass (memory vs speed).
        second_phase: linears (same syntax as `targets`) compressed after the rest of their block,
            because their inputs come from the block's other linears (attention output, MLP down).
    """

    calibration: str = "default"
    num_windows: int = 128
    seq_len: int = 256
    batch_size: int = 8
    second_phase: tuple[str, ...] = DEFAULT_SECOND_PHASE

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.method_name or "low-rank"
        for key in ("num_windows", "seq_len", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: `{key}` must be a positive integer, got {value!r}")


# ---------------------------------------------------------------- rank arithmetic (pure)


def uniform_rank(out_features: int, in_features: int, keep: float) -> int:
    """r = ⌊keep·m·n/(m+n)⌋: the rank whose factors hold `keep` of the dense parameters."""
    # The epsilon stops 0.6·m·n/(m+n) = 19.999999 from flooring to 19 through float rounding.
    return int(math.floor(keep * out_features * in_features / (out_features + in_features) + 1e-9))


def factoring_saves(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank-`rank` factors are strictly smaller than the dense matrix."""
    return 0 < rank < min(out_features, in_features) and rank * (out_features + in_features) < out_features * in_features


@dataclass
class LayerPlan:
    """What happens to one targeted linear: factored at `rank`, or kept dense (`rank` None)."""

    name: str
    out_features: int
    in_features: int
    rank: int | None
    reason: str = ""

    @property
    def params_dense(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_kept(self) -> int:
        if self.rank is None:
            return self.params_dense
        return self.rank * (self.out_features + self.in_features)


def plan_layer(name: str, out_features: int, in_features: int, rank: int, keep: float) -> LayerPlan:
    """Factor at `rank` unless keep = 1 or factoring would not save parameters."""
    if keep >= 1:
        return LayerPlan(name, out_features, in_features, None, "keep ratio 1: dense")
    rank = max(rank, 1)
    if not factoring_saves(out_features, in_features, rank):
        return LayerPlan(name, out_features, in_features, None,
                         f"rank {rank} would not save parameters on {out_features}x{in_features}: dense")
    return LayerPlan(name, out_features, in_features, rank)


def plan_uniform(shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, LayerPlan]:
    """Uniform allocation: every (m, n) matrix keeps ⌊keep·m·n/(m+n)⌋ ranks."""
    return {name: plan_layer(name, m, n, uniform_rank(m, n, keep), keep) for name, (m, n) in shapes.items()}


def keep_ratio_reached(plans: dict[str, LayerPlan]) -> tuple[int, int, float]:
    """(params_dense, params_kept, kept/dense) over the planned linears (weights only, no biases)."""
    dense = sum(p.params_dense for p in plans.values())
    kept = sum(p.params_kept for p in plans.values())
    return dense, kept, kept / dense if dense else 1.0


# ---------------------------------------------------------------- factor helpers (pure)


def split_singular(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Fuse √Σ into both factors: (u (m, k), s (k,), vh (k, n)) -> (U_r√Σ_r (m, r), √Σ_r V_rᵀ (r, n))."""
    root = s[:rank].clamp_min(0).sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def check_finite(name: str, *tensors: Tensor) -> None:
    """Refuse to install NaN/inf factors: a silent NaN would poison every later block."""
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise ModelError(
                f"non-finite low-rank factors for `{name}` (calibration statistics are degenerate); "
                "use more calibration windows, or add the layer to `ignore`"
            )


# ---------------------------------------------------------------- calibration statistics


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
                raise ModelError("internal: teacher activations missing or misaligned with the student's")
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
        moved = {k: None if t is None else t.to(device) for k, t in
                 (("abs_sum", self.abs_sum), ("gram", self.gram), ("cross", self.cross))}
        return LayerStats(self.kind, self.tokens, **moved, extras=self.extras)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.abs_sum, self.gram, self.cross) if t is not None)


def _acc(total: Tensor | None, batch: Tensor) -> Tensor:
    batch = batch.double()
    return batch if total is None else total.add_(batch)


# ---------------------------------------------------------------- the compression driver

Factorize = Callable[[str, Tensor, "LayerStats | None", int, LowRankConfig], tuple[Tensor, Tensor, dict]]


@dataclass
class _Run:
    """Mutable state of one compression run: the plan, the per-module rows and the notes."""

    model: nn.Module
    config: LowRankConfig
    ctx: Context
    factorize: Factorize
    plans: dict[str, LayerPlan]
    rows: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def compress(self, name: str, stats: LayerStats | None) -> None:
        """Factor `name` at its planned rank and swap a LowRankLinear in (weights keep their dtype)."""
        plan = self.plans[name]
        module = self.model.get_submodule(name)
        weight = linear_weight(module).detach()
        if stats is not None:
            stats = stats.to(self.ctx.device)
        left, right, info = self.factorize(name, weight.to(self.ctx.device), stats, plan.rank, self.config)
        check_finite(name, left, right)
        bias = getattr(module, "bias", None)
        layer = LowRankLinear.from_factors(left.to(weight), right.to(weight), None if bias is None else bias.detach())
        replace_module(self.model, name, layer)
        self.notes.extend(info.pop("notes", []))
        self.rows[name].update({k: _scalar(v) for k, v in info.items()})
        self.rows[name]["status"] = "factored"


def compress_model(model: nn.Module, config: LowRankConfig, ctx: Context, factorize: Factorize,
                   *, stats_kind: str | None) -> StageResult:
    """Plan ranks, factor every targeted linear (sequentially calibrated when `stats_kind` is set:
    `abs_mean`, `hessian` or `hessian+cross` = also the teacher's inputs) and report."""
    started = time.perf_counter()
    with PeakMemory(ctx.device) as memory:
        plans, notes = plan_ranks(model, config, ctx)
        run = _Run(model, config, ctx, factorize, plans, notes=notes)
        run.rows = {name: _row(plan) for name, plan in plans.items()}
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if stats_kind is None:
                    for name in ctx.progress([n for n, p in plans.items() if p.rank], f"{config.method_name}"):
                        run.compress(name, None)
                else:
                    _compress_sequential(run, stats_kind)
        finally:
            model.train(training)
    return _result(run, time.perf_counter() - started, memory.peak_mb)


def plan_ranks(model: nn.Module, config: LowRankConfig, ctx: Context) -> tuple[dict[str, LayerPlan], list[str]]:
    """Select the targeted linears and decide each one's rank (uniform or WeLore allocation)."""
    selected = select_linears(model, config.targets, config.ignore)
    notes = []
    already = [n for n, m in selected.items() if isinstance(m, CompressedLinear)]
    if already:
        notes.append(f"{len(already)} targeted layers are already compressed and were skipped: {already[:4]}")
    shapes = {n: tuple(linear_shape(m)) for n, m in selected.items() if n not in already}
    if not shapes:
        raise ConfigError(f"{config.method_name}: every targeted linear is already compressed; nothing to do")
    if config.allocation == "welore":
        from .welore import welore_plan  # welore.py builds on this module, so import it lazily

        plans, tau = welore_plan({n: linear_weight(selected[n]) for n in shapes}, config.rank, config.min_ratio)
        notes.append(f"WeLore allocation: global tau {tau:.4f}")
    else:
        plans = plan_uniform(shapes, config.rank)
    return plans, notes


def _compress_sequential(run: _Run, stats_kind: str) -> None:
    """The block loop: collect statistics phase by phase, compress, propagate compressed outputs.

    Blocks are moved one at a time to `ctx.device` (the model itself may stay on the CPU)."""
    config, model, device = run.config, run.model, run.ctx.device
    windows = calibration_windows(config, run.ctx, run.notes)
    blocks = transformer_blocks(model)
    _keep_out_of_block_dense(run, blocks)
    home = _model_device(model)
    student = inputs_to(capture_block_inputs(model, windows, config.batch_size, home), device)
    teacher = student if stats_kind == "hessian+cross" else None
    run.metrics.update(calibration_windows=windows.shape[0], calibration_tokens=student.num_tokens(),
                       activation_memory_mb=_inputs_bytes(student) * (2 if teacher is not None else 1) / 2**20)
    stats_bytes = 0
    for block_name, block in run.ctx.progress(blocks, f"{config.method_name}: blocks"):
        block.to(device)
        factored = {n: m for n, m in block_linears(block, block_name, run.plans).items() if run.plans[n].rank}
        original = copy.deepcopy(block) if teacher is not None and factored else None
        for phase in split_phases(factored, config.second_phase):
            stats = collect_stats(block, block_name, phase, student, stats_kind, original, teacher)
            stats_bytes = max(stats_bytes, sum(s.nbytes() for s in {id(s): s for s in stats.values()}.values()))
            for name in phase:
                run.compress(name, stats[name])
        next_student = run_block(block, student)
        if teacher is not None:
            # Until something upstream is compressed the teacher stream equals the student's.
            same = teacher is student and original is None
            teacher = next_student if same else run_block(original if original is not None else block, teacher)
        student = next_student
        block.to(home)
    run.metrics["stats_memory_mb"] = stats_bytes / 2**20


def calibration_windows(config: CalibratedLowRankConfig, ctx: Context, notes: list[str]) -> Tensor:
    """Calibration token windows (N, seq_len) from the `calib` split; warns below 64 windows."""
    windows = ctx.windows(config.calibration, split="calib", seq_len=config.seq_len, num_windows=config.num_windows)
    if windows.shape[0] == 0:
        raise DataError(f"{config.method_name}: the calibration set `{config.calibration}` is empty; "
                        "pass a text source with at least one window of `seq_len` tokens")
    if windows.shape[0] < MIN_CALIBRATION_WINDOWS:
        message = (f"{config.method_name}: only {windows.shape[0]} calibration windows of {config.seq_len} tokens "
                   f"(< {MIN_CALIBRATION_WINDOWS}); statistics may be poor — raise `num_windows` or use more text")
        warnings.warn(message, stacklevel=2)
        notes.append(message)
    return windows


def split_phases(linears: dict[str, nn.Module], second_phase: tuple[str, ...]) -> list[dict[str, nn.Module]]:
    """[first phase, second phase] (empty phases dropped): `second_phase` names read the outputs of
    the block's other linears, so they are calibrated after those are compressed."""
    second = {n: m for n, m in linears.items() if any(matches(n, p) for p in second_phase)}
    first = {n: m for n, m in linears.items() if n not in second}
    return [phase for phase in (first, second) if phase]


def collect_stats(block: nn.Module, block_name: str, phase: dict[str, nn.Module], student: BlockInputs,
                  kind: str, original: nn.Module | None = None,
                  teacher: BlockInputs | None = None) -> dict[str, LayerStats]:
    """Statistics of the `phase` linears' inputs over every calibration batch.

    For `hessian+cross` each batch first runs the `original` (uncompressed) block on the teacher's
    hidden states, keeping that batch's teacher inputs, then the current block on the student's, so
    X_f Xᵀ pairs the same tokens. Linears fed the same tensor (q/k/v, gate/up) share one LayerStats.
    """
    stats: dict[str, LayerStats] = {}
    alias: dict[str, str] = {}
    offset = len(block_name) + 1
    for b in range(len(student)):
        teacher_x: dict[str, Tensor] = {}
        if kind == "hessian+cross":
            twins = {n: original.get_submodule(n[offset:]) for n in phase}
            with capture_linear_inputs(twins, teacher_x.__setitem__):
                _forward(original, teacher, b)
        seen: list[tuple[str, Tensor]] = []

        def add(name: str, x: Tensor) -> None:
            if b == 0:
                leader = next((n for n, y in seen if y is x or (y.shape == x.shape and torch.equal(y, x))), None)
                if leader is not None:
                    alias[name] = leader
                    return
                seen.append((name, x))
                stats[name] = LayerStats(kind)
            if name not in alias:
                stats[name].add(x, teacher_x.get(name))

        with capture_linear_inputs(phase, add):
            _forward(block, student, b)
    for name, leader in alias.items():
        stats[name] = stats[leader]
    return stats


def _forward(block: nn.Module, inputs: BlockInputs, index: int) -> None:
    block(inputs.hidden[index], *inputs.args[index], **inputs.kwargs[index])


def inputs_to(inputs: BlockInputs, device: torch.device) -> BlockInputs:
    """BlockInputs with every tensor (hidden, args, kwargs) on `device`."""
    def move(value):
        if isinstance(value, Tensor):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return BlockInputs([h.to(device) for h in inputs.hidden], [move(a) for a in inputs.args],
                       [{k: move(v) for k, v in kw.items()} for kw in inputs.kwargs])


def _keep_out_of_block_dense(run: _Run, blocks: list[tuple[str, nn.Module]]) -> None:
    """Targeted linears outside every block (e.g. BERT's pooler) get no calibration inputs."""
    prefixes = tuple(f"{name}." for name, _ in blocks)
    for name, plan in run.plans.items():
        if plan.rank and not name.startswith(prefixes):
            plan.rank, plan.reason = None, "outside the transformer blocks (no calibration inputs): dense"
            run.rows[name] = _row(plan)
            run.notes.append(f"{name} is outside the transformer blocks and was kept dense; add it to `ignore`")


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _inputs_bytes(inputs: BlockInputs) -> int:
    return sum(h.numel() * h.element_size() for h in inputs.hidden)


def _row(plan: LayerPlan) -> dict:
    return {"module": plan.name, "shape": f"{plan.out_features}x{plan.in_features}",
            "rank": plan.rank if plan.rank is not None else "dense", "params_dense": plan.params_dense,
            "params_kept": plan.params_kept, "status": "planned" if plan.rank else plan.reason}


def _scalar(value):
    if isinstance(value, Tensor):
        return value.item()
    return value


def _result(run: _Run, seconds: float, peak_mb: float) -> StageResult:
    dense, kept, reached = keep_ratio_reached(run.plans)
    factored = sum(1 for p in run.plans.values() if p.rank)
    if len(run.plans) > factored:
        run.notes.append(f"{len(run.plans) - factored} of {len(run.plans)} targeted layers kept dense "
                         "(factoring would not save parameters, or keep ratio 1); see per-module `status`")
    metrics = {"params_dense": dense, "params_kept": kept, "keep_ratio_requested": run.config.rank,
               "keep_ratio_reached": reached, "layers_factored": factored,
               "layers_dense": len(run.plans) - factored, "seconds": seconds, "peak_memory_mb": peak_mb,
               **run.metrics}
    return StageResult(metrics=metrics, per_module=list(run.rows.values()), notes=run.notes)


class PeakMemory:
    """Peak memory above the starting point while the block runs, in MiB.

    CUDA: torch's allocator peak. CPU: the process RSS sampled every 5 ms by a thread (torch
    allocations bypass tracemalloc, and ru_maxrss cannot go down to show a stage's own peak).
    """

    def __init__(self, device: torch.device | str, interval: float = 0.005) -> None:
        self.device, self.interval, self.peak_mb = torch.device(device), interval, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = max(peak - self._start, 0) / 2**20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

"""`fit`, the loop every fine-tuning stage calls (the `backprop` stage itself is training/backprop.py).

This module registers no method, so the stages built on it import it without registering others.

Contract (adapter stages call this; it trains `params` of `model` in place):

    from compressor.training import TrainConfig, fit

    @dataclass(frozen=True, kw_only=True)     # in compressor/configs/lora.py (torch-free)
    class LoraConfig(TrainConfig, method="lora", kind="finetune", apply="compressor.adapters.lora"):
        rank: int = 8                         # inherits steps, lr, data, task, optimizer, ...

    @register(LoraConfig)
    def apply(model, config, ctx):
        ...inject adapters...
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        result = fit(model, params, config, ctx)       # -> TrainResult
        return result.stage_result(metrics={"rank": config.rank})

* `params`: a {name: Parameter} dict or a list of the model's Parameters. Only they train:
  every other parameter is frozen for the run and its requires_grad flag restored afterwards.
  A classification head that the data layer adds to a bare encoder trains too.
* `config.optimizer`: "adamw" (backprop, grad accumulation, clipping, schedule, mixed precision,
  checkpoints every `checkpoint_every` steps, `resume`) or "mezo" (forward passes only; see
  `compressor.training.mezo`). The same `params` work with both.
* `loss_fn(model, batch) -> scalar Tensor` (default: next-token CE for task "lm", CE over the
  class / label-word logits for "classification"); batches are dicts of tensors (`TaskData`).
* `eval_fn(model) -> {metric: float}` (default: held-out perplexity or accuracy), run before and
  after training and every `eval_every` steps.
* `data`: a `TaskData` to train on instead of `config.data` (e.g. `in_order_windows(windows)`:
  given token windows in their stored order, no held-out set; pass an `eval_fn` with it).
* Backprop only: `make_optimizer(params) -> Optimizer` replaces AdamW (the params in the model's
  order; the schedule, clipping and checkpoints still apply), and `after_step(done)` runs after
  each update with the number of finished steps, inside the same signal-deferred block (an
  interrupt never separates an update from it): a method's per-step or per-epoch bookkeeping,
  e.g. maestro's progressive shrinking or a support statistic.
* Checkpoints and the MeZO log go under `ctx.out_dir`; `method` names the run in them (default:
  the config class name without "Config", lower-cased) and a resume from another method or
  model is refused.
* Multi-GPU: run the same command under `accelerate launch` (see `compressor.training.runtime`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compressor.config import MethodConfig
from compressor.errors import ConfigError
from compressor.offload import input_device, is_dispatched
from compressor.outdir import preserve_progress, signals_deferred
from compressor.report.records import StageResult
from compressor.targeting import select_linears
from compressor.training.checkpoint import (
    load_checkpoint,
    model_identity,
    save_checkpoint,
    weights_hash,
)
from compressor.training.config import TrainConfig
from compressor.training.data import HEAD_NAME, TaskData, build_task_data
from compressor.training.losses import default_loss_fn, evaluate
from compressor.training.mezo_optimizer import run_mezo
from compressor.training.run import TrainRun, decays, lr_factor
from compressor.training.runtime import PeakMemory, Runtime


@dataclass
class TrainResult:
    """What a training run measured.

    losses: training loss per optimizer step (this run's steps only when resumed).
    evals: [{"step": k, metric: value, ...}] from `eval_every`, plus before (step start) and after.
    peak_memory_mb: CUDA allocator peak, or peak RSS of the process, during the training loop.
    tokens_per_s: training tokens (non-padding) consumed per second of the training loop.
    """

    losses: list[float]
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    evals: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    peak_memory_mb: float = 0.0
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    start_step: int = 0
    steps: int = 0

    def metrics(self) -> dict[str, float]:
        out = {
            # None (not NaN) when a resumed run had no step left: NaN means "diverged" downstream.
            "train_loss_first": self.losses[0] if self.losses else None,
            "train_loss_last": self.losses[-1] if self.losses else None,
            "trainable_params": self.trainable_params,
            "peak_memory_mb": round(self.peak_memory_mb, 1),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "seconds": round(self.seconds, 2),
            "steps": self.steps,
        }
        out.update({f"{k}_before": v for k, v in self.eval_before.items()})
        out.update({f"{k}_after": v for k, v in self.eval_after.items()})
        return out

    def curves(self) -> dict[str, list[float]]:
        """{"loss": one value per step, "eval_<metric>": the latest evaluation at each step}.

        Evaluations are held constant between the steps they ran at (`eval_steps`), so every
        curve shares the loss curve's x axis (steps of this run) and plots as a staircase.
        """
        curves = {"loss": [float(v) for v in self.losses]}
        at = {e["step"] - self.start_step: e for e in self.evals}
        for key in self.eval_after:
            name = key if key.startswith("eval_") else f"eval_{key}"
            values, current = [], float(self.eval_before[key])
            for index in range(self.steps + 1):
                current = float(at[index][key]) if index in at else current
                values.append(current)
            curves[name] = values
        return curves

    def eval_steps(self) -> str:
        return ",".join(str(e["step"]) for e in self.evals)

    def stage_result(self, metrics: dict | None = None, notes: Iterable[str] = ()) -> StageResult:
        """A StageResult with `metrics()` (plus extra `metrics`), the curves and `notes`."""
        merged = {**self.metrics(), "eval_steps": self.eval_steps(), **(metrics or {})}
        return StageResult(metrics=merged, notes=list(notes), curves=self.curves())


def fit(
    model: nn.Module,
    params: list[nn.Parameter] | dict[str, nn.Parameter],
    config: TrainConfig,
    ctx,
    *,
    loss_fn: Callable[[nn.Module, dict], Tensor] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    data: TaskData | None = None,
    method: str | None = None,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `params` of `model` in place with `config`; see the module docstring."""
    if config.optimizer != "adamw" and (make_optimizer is not None or after_step is not None):
        raise ConfigError(
            f"fit: `make_optimizer` and `after_step` apply to backprop training; `optimizer` is "
            f"{config.optimizer!r}: use optimizer 'adamw' or drop them"
        )
    run = _prepare_run(model, params, config, ctx, loss_fn, eval_fn, data, method)
    run.make_optimizer, run.after_step = make_optimizer, after_step  # backprop's hooks (run_backprop)
    with trainable_only(model, run.params.values(), grad=config.optimizer == "adamw"):
        before = run.eval_fn(model)
        run.memory.reset()
        start = time.perf_counter()
        _train(run)
        seconds = time.perf_counter() - start
        peak = run.memory.peak_mb()
        after = run.eval_fn(model)
    evals = [{"step": run.start_step, **before}, *run.evals, {"step": run.start_step + len(run.losses), **after}]
    return TrainResult(
        losses=run.losses, eval_before=before, eval_after=after, evals=evals,
        trainable_params=sum(p.numel() for p in run.params.values()), peak_memory_mb=peak,
        tokens_per_s=run.tokens / max(seconds, 1e-9), seconds=seconds,
        start_step=run.start_step, steps=len(run.losses),
    )  # fmt: skip


def no_evaluation(model: nn.Module) -> dict[str, float]:
    """An `eval_fn` for callers that evaluate on their own: measures nothing."""
    return {}


def _prepare_run(model, params, config, ctx, loss_fn, eval_fn, data, method) -> TrainRun:
    """Resolve the defaults of `fit`: data, a head's parameters, loss, evaluation, runtime, seed."""
    named = named_params(model, params)
    data = data if data is not None else build_task_data(config, ctx, model)
    head = getattr(model, HEAD_NAME, None)
    if head is not None:  # a head the data layer added to a bare encoder trains too
        named.update({f"{HEAD_NAME}.{n}": p for n, p in head.named_parameters()})
    # an offloaded model's first parameter may be `meta`: batches go where its embeddings run
    device = input_device(model) if is_dispatched(model) else next(model.parameters()).device
    runtime = Runtime(config.mixed_precision if config.optimizer == "adamw" else "no", device)
    return TrainRun(
        model=model, params=named, data=data, loss_fn=loss_fn or default_loss_fn(data),
        eval_fn=eval_fn or (lambda m: evaluate(m, data, config.batch_size, runtime.device)),
        config=config, ctx=ctx, runtime=runtime, method=method or method_name(config),
        seed=config.seed if config.seed is not None else int(getattr(ctx, "seed", 0) or 0),
        identity=run_identity(model, config, ctx), memory=PeakMemory(runtime.device),
    )  # fmt: skip


def run_identity(model: nn.Module, config: TrainConfig, ctx) -> dict:
    """Architecture fingerprint, plus the base weights' content hash when the run can be resumed
    or resumes (hashing reads every weight once, so runs that save nothing skip it)."""
    identity = model_identity(model)
    if config.resume or getattr(ctx, "out_dir", None) is not None:
        identity["base_hash"] = weights_hash(model)
    return identity


def _train(run: TrainRun) -> None:
    """Dispatch to the optimizer's loop; if it stops early, keep its checkpoints / log."""
    try:
        if run.config.optimizer == "mezo":
            run_mezo(run)
        else:
            run_backprop(run)
    except BaseException as err:
        kept = preserve_progress(run.out_dir)
        if kept is not None:  # the CLI's one-line error says where the progress went
            err.add_note(f"training progress kept in `{kept}`: rerun the same command with `--resume {kept}`")
        raise


def named_params(model: nn.Module, params) -> dict[str, nn.Parameter]:
    """Name the given parameters by the model's own names (the order is the model's)."""
    if isinstance(params, dict):
        wanted = {id(p) for p in params.values()}
    else:
        wanted = {id(p) for p in params}
    named = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    if len(named) != len(wanted):
        raise ConfigError(
            f"fit: {len(wanted) - len(named)} of the {len(wanted)} given parameters are not parameters "
            "of `model`; pass parameters taken from model.named_parameters()"
        )
    if not named:
        raise ConfigError("fit: no parameters to train; pass a non-empty `params`")
    frozen = [f"{n} ({p.dtype})" for n, p in named.items() if not p.dtype.is_floating_point]
    if frozen:
        raise ConfigError(
            f"fit: {len(frozen)} parameter(s) are quantized and cannot train, e.g. {frozen[0]}; "
            "on a 4/8-bit base train adapters instead (`lora`, or `mezo` with adapter: lora)"
        )
    return named


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: Iterable[nn.Parameter], *, grad: bool):
    """Freeze every parameter except `params` (MeZO: freeze all) and restore the flags afterwards."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    for param in model.parameters():
        param.requires_grad_(grad and id(param) in chosen)
    try:
        yield
    finally:
        for param in model.parameters():
            param.requires_grad_(flags.get(id(param), param.requires_grad))


def method_name(config: MethodConfig) -> str:
    """The registered name of the config's stage, else the class name without "Config"."""
    return (
        getattr(type(config), "method_name", "")
        or type(config).__name__.removesuffix("Config").lower()
    )


# -- backprop ---------------------------------------------------------------------------------


def build_optimizer(
    run: TrainRun,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer (`run.make_optimizer`'s, else `adamw`) and the warm-up + decay schedule."""
    if run.make_optimizer is not None:
        optimizer = run.make_optimizer(list(run.params.values()))
    else:
        optimizer = adamw(run)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, run.config)
    )
    return optimizer, scheduler


def adamw(run: TrainRun) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices only."""
    groups = [
        {
            "params": [p for n, p in run.params.items() if decays(n, p)],
            "weight_decay": run.config.weight_decay,
        },
        {"params": [p for n, p in run.params.items() if not decays(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=run.config.learning_rate)


def run_backprop(run: TrainRun) -> None:
    """Optimizer steps from `start_step` to `config.steps`, with checkpoints and resume."""
    config, runtime = run.config, run.runtime
    optimizer, scheduler = build_optimizer(run)
    if config.resume:
        run.start_step = load_checkpoint(
            config.resume, run.meta(), run.params, optimizer, scheduler,
            run.out_dir if run.runtime.is_main else None,
        )  # fmt: skip
    model, optimizer = runtime.prepare(run.model, optimizer)
    model.train()
    done = run.start_step
    with run:
        try:
            for step in range(run.start_step, config.steps):
                loss = _accumulate_gradients(run, model, step)
                # A signal lands before or after a whole update, never inside one: so the
                # checkpoint written on interrupt is exactly the state after `done` steps.
                with signals_deferred():
                    run.runtime.step(optimizer, list(run.params.values()), config.max_grad_norm)
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    if run.after_step is not None:
                        run.after_step(step + 1)
                    done = step + 1
                run.record(step, loss)
                if run.diverged_at is not None:
                    break  # the pipeline refuses to publish a diverged result; no use going on
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    _checkpoint(run, done, optimizer, scheduler)
        except KeyboardInterrupt:
            # Keep the finished steps, whatever `checkpoint_every` says: the interrupted run resumes from here.
            if done > run.start_step and run.diverged_at is None:
                with signals_deferred():  # a second signal (the launcher passing it on) waits for the save
                    _checkpoint(run, done, optimizer, scheduler)
            raise
    run.model.eval()


def _accumulate_gradients(run: TrainRun, model: nn.Module, step: int) -> float:
    """Gradients of step `step` summed over `grad_accum` micro-batches; returns the mean loss."""
    accum = run.config.grad_accum
    total = 0.0
    for micro in range(accum):
        batch = run.batch(step * accum + micro)
        with run.runtime.autocast():
            loss = run.loss_fn(model, batch) / accum
        run.runtime.backward(loss)
        total += loss.item()
    return run.runtime.mean_across_ranks(total)


def _checkpoint(run: TrainRun, step: int, optimizer, scheduler) -> None:
    if run.out_dir is None or not run.runtime.is_main:
        return
    save_checkpoint(run.out_dir, step, run.meta(), run.params, optimizer, scheduler)


def trainable_for_targets(model: nn.Module, config: MethodConfig) -> dict[str, nn.Parameter]:
    """Every parameter (no `targets`), or the weights and biases of the selected linears."""
    if not config.targets:
        return dict(model.named_parameters())
    modules = select_linears(model, config.targets, config.ignore)
    return {
        f"{name}.{pname}": p for name, mod in modules.items() for pname, p in mod.named_parameters()
    }

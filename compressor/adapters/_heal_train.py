"""The healing loop behind `heal` and `welore-tune`: which parameters of a compressed model train,
optional LoRA pairs merged back, the distillation loss, and `heal()`. Registers no method; the
stages' configs extend `HealFields` (compressor/configs/heal.py; see compressor/adapters/heal.py
for what healing does)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configs.heal import LOSSES, HealFields  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..layers import CompressedLinear, LowRankLinear
from ..report.records import StageResult
from ..targeting import is_linear, matches
from ..training import fit
from ._common import count_params, finish, param_metrics, with_default_lr

PRUNED_MIN_ZEROS = 0.2  # a plain linear this sparse is a pruned one: its zeros stay zero


def healable_layers(model: nn.Module, targets=(), ignore=(), pruned_linears: bool = True) -> dict[str, nn.Module]:
    """{name: layer} of the compressed layers (and pruned plain linears) selected by targets/ignore."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, CompressedLinear)
        or (pruned_linears and module is not head and is_linear(module) and zero_fraction(module) >= PRUNED_MIN_ZEROS)
    }
    return {
        n: m
        for n, m in found.items()
        if (not targets or any(matches(n, t) for t in targets)) and not any(matches(n, i) for i in ignore)
    }


def zero_fraction(module: nn.Module) -> float:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point or weight.numel() == 0:
        return 0.0
    return float((weight == 0).float().mean())


def layer_params(name: str, module: nn.Module, train_bias: bool) -> dict[str, nn.Parameter]:
    """The trainable tensors of one healed layer: every floating parameter but the bias (unless
    `train_bias`); packed positions and masks are buffers and never train."""
    return {
        f"{name}.{pname}": p
        for pname, p in module.named_parameters(recurse=False)
        if p.dtype.is_floating_point and (train_bias or pname != "bias")
    }


@contextlib.contextmanager
def zeros_stay_zero(layers: dict[str, nn.Module]):
    """Mask the weight gradient of pruned plain linears to their non-zeros while active."""
    handles = []
    for module in layers.values():
        if isinstance(module, CompressedLinear):
            continue
        mask = (module.weight != 0).to(module.weight.dtype)
        handles.append(module.weight.register_hook(lambda grad, mask=mask: grad * mask))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def lora_hosts(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The layers that get a LoRA pair: the healed low-rank ones and the dense linears outside
    `layers` (lm_head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hosts = {n: m for n, m in layers.items() if isinstance(m, LowRankLinear)}
    hosts.update({n: m for n, m in model.named_modules()
                  if n not in layers and m is not head and type(m) is nn.Linear})  # fmt: skip
    return hosts


@contextlib.contextmanager
def lora_pairs(hosts: dict[str, nn.Module], rank: int, seed: int):
    """Attach LoRA pairs (`heal_lora_a`, `heal_lora_b`) to each host while active, yield
    {name: parameter}; on exit merge each pair into its host (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    params, handles = {}, []
    for name, host in hosts.items():
        weight = next(host.parameters())
        a = torch.empty(rank, host.in_features).uniform_(-1, 1, generator=generator) / host.in_features**0.5
        host.heal_lora_a = nn.Parameter(a.to(weight))
        host.heal_lora_b = nn.Parameter(torch.zeros(host.out_features, rank).to(weight))
        handles.append(host.register_forward_hook(add_lora))
        params.update({f"{name}.heal_lora_a": host.heal_lora_a, f"{name}.heal_lora_b": host.heal_lora_b})
    try:
        yield params
    finally:
        for handle in handles:
            handle.remove()
        for host in hosts.values():
            merge_lora(host)


def add_lora(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return output + (args[0] @ module.heal_lora_a.t()) @ module.heal_lora_b.t()


@torch.no_grad()
def merge_lora(host: nn.Module) -> None:
    """Fold the host's LoRA pair into its weights and remove it (exact up to rounding)."""
    a, b = host.heal_lora_a.detach(), host.heal_lora_b.detach()
    del host.heal_lora_a, host.heal_lora_b
    if isinstance(host, LowRankLinear):
        host.u = nn.Parameter(torch.cat([host.u.detach(), b], 1), requires_grad=host.u.requires_grad)
        host.v = nn.Parameter(torch.cat([host.v.detach(), a], 0), requires_grad=host.v.requires_grad)
        host.rank = host.u.shape[1]
    else:
        host.weight.add_(b @ a)


def distillation_loss(teacher: nn.Module, temperature: float):
    """loss_fn(model, batch): mean over predicted tokens of T²·KL(teacher ‖ student) at temperature T."""

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        ids = batch["input_ids"]
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float() / temperature, -1)
        student = F.log_softmax(model(input_ids=ids).logits[:, :-1].float() / temperature, -1)
        kl = (target.exp() * (target - student)).sum(-1)
        return kl.mean() * temperature**2

    return loss_fn


def load_teacher(config: HealFields, ctx: Context, model: nn.Module) -> nn.Module:
    """The dense teacher of `loss: kl` (see the module docstring), on the student's device."""
    from ..models import load_model

    source = ctx.model_source if config.teacher == "source" else config.teacher
    teacher = load_model(source).model
    if any(isinstance(m, CompressedLinear) for m in teacher.modules()):
        raise ConfigError(
            f"heal: the teacher `{source}` holds compressed layers; distillation needs the dense "
            "model: set `teacher:` to the uncompressed model's path or id"
        )
    device = next(model.parameters()).device
    return teacher.to(device).eval().requires_grad_(False)


def heal(model: nn.Module, config: HealFields, ctx: Context, teacher: nn.Module | None = None,
         *, method: str = "heal", layers: dict[str, nn.Module] | None = None, eval_fn=None) -> StageResult:
    """Train the compressed parameters of `model` in place (`teacher`: a dense model for `kl`,
    else loaded as `config.teacher` says; `eval_fn`: fit's held-out evaluation, default its own)."""
    config = with_default_lr(config, adamw=1e-4, mezo=1e-6)
    if layers is None:
        layers = healable_layers(model, config.targets, config.ignore, config.pruned_linears)
    if not layers:
        raise ConfigError(
            f"{method}: the model has no compressed layers to heal (low-rank, N:M, dense×sparse or "
            "pruned linears) matching targets/ignore; compress it first, e.g. "
            "`compressor compress --method saes-svd MODEL --out DIR`, and pass DIR as the model"
        )
    pruned = [n for n, m in layers.items() if not isinstance(m, CompressedLinear)]
    if pruned and config.optimizer == "mezo":
        raise ConfigError(
            f"{method}: `optimizer: mezo` perturbs every entry and would move the pruned zeros of "
            f"{len(pruned)} plain linear(s) (e.g. {pruned[0]}); use `optimizer: adamw` or `pruned_linears: false`"
        )
    params = {k: v for n, m in layers.items() for k, v in layer_params(n, m, config.train_bias).items()}
    loss_fn = None
    if config.loss == "kl":
        loss_fn = distillation_loss(teacher if teacher is not None else load_teacher(config, ctx, model),
                                    config.temperature)
    hosts = lora_hosts(model, layers) if config.lora_r else {}
    with zeros_stay_zero(layers), lora_pairs(hosts, config.lora_r, int(getattr(ctx, "seed", 0) or 0)) as lora:
        params.update(lora)
        result = fit(model, params, config, ctx, loss_fn=loss_fn, eval_fn=eval_fn, method=method)
    rows = [{"module": n, "layer": type(m).__name__, "trainable": sum(p.numel() for p in layer_params(n, m, config.train_bias).values())}
            for n, m in layers.items()]  # fmt: skip
    notes = [f"heal: LoRA r={config.lora_r} on {len(hosts)} layers, merged (low-rank layers' rank +{config.lora_r})"] if hosts else []
    return finish(result, metrics={**param_metrics(model, count_params(params)), "healed_layers": len(layers),
                                   "lora_layers": len(hosts)}, per_module=rows, notes=notes)  # fmt: skip

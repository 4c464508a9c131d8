"""NOLA: LoRA factors as linear combinations of frozen random bases (Koohpayegani et al., ICLR 2024,
arXiv 2310.02556; reference code UCDvision/NOLA).

With peft's LoRA naming, A (r, in) is applied first and B (out, r) second:

    ΔW = (α/r) · B · A,   A = A₀ + Σ_{i<k} a_i A_i,   B = Σ_{j<l} b_j B_j

(METHODS.md §7 writes the product as A·B with A (m×r); same thing, factors named the other way.)
A_i and B_j ~ U(−1, 1)/√(number of bases) are regenerated from one seed per layer and never saved.
A₀ is a fixed Kaiming-uniform matrix drawn from the same seed (the official code's frozen lora_A
weight) and B has no fixed part, so ΔW = 0 at step 0 while B's coefficients already receive
gradients; A's coefficients start moving once B is non-zero. Only the k + l coefficients train,
and the adapter file holds only them and the seed.

Bases are drawn on the CPU from a torch.Generator, so a seed gives the same bases on every device
(CUDA generators differ from the CPU one). By default they are regenerated chunk by chunk in the
forward and again in the backward pass, as the official code does, so memory stays at one chunk;
`cache_bases` keeps them as non-persistent buffers instead (faster; k·r·in + l·out·r floats per
layer, reported as `basis_cache_bytes`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .. import kernels
from ..context import Context
from ..errors import ConfigError, ModelError
from ..layers import CompressedLinear, register_layer
from ..registry import register
from ..report.records import StageResult
from ..targeting import linear_shape, replace_module, select_linears
from ..training import TrainConfig, fit
from ._common import (
    adapter_folder, base_weight, count_params, is_quantized, layer_seed, param_metrics, run_seed,
    with_default_lr, write_adapter,
)

ADAPTER_FILE = "nola_adapter.safetensors"
# Bases are drawn this many at a time. It fixes the random stream, so it is part of the format.
BASIS_CHUNK = 64
# Each layer seed s drives three streams: A's fixed part, A's bases and B's bases.
_FIXED, _BASES_A, _BASES_B = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class NolaConfig(TrainConfig):
    """Args (plus every `TrainConfig` field; `targets` default to every linear but `lm_head`):
        rank: r, the inner dimension of A and B (official LLaMA setting 16).
        alpha: scale numerator; ΔW is multiplied by alpha / rank (official LLaMA setting 4).
        num_basis_a: k, random bases (and trainable coefficients) for A per layer (paper 512).
        num_basis_b: l, the same for B.
        cache_bases: keep the bases as non-persistent buffers instead of regenerating them in
            every forward and backward pass (faster, k·r·in + l·out·r more floats per layer).
        merge: after training, fold ΔW into the weights (plain nn.Linear, outputs unchanged).
        lr: None = 1e-3 with adamw (the NOLA LLaMA recipe), 5e-5 with mezo.
    """

    rank: int = 16
    alpha: float = 4.0
    num_basis_a: int = 512
    num_basis_b: int = 512
    cache_bases: bool = False
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("rank", "num_basis_a", "num_basis_b"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"nola: `{key}` must be an integer >= 1, got {value!r}; the paper uses "
                                  "rank 16 with 512 bases per factor")
        if not self.alpha > 0:
            raise ConfigError(f"nola: `alpha` must be > 0, got {self.alpha}; ΔW is scaled by alpha / rank "
                              "(official LLaMA setting alpha 4)")


# -- pure numerics -----------------------------------------------------------------------------


def stream_seed(layer_seed_: int, stream: int) -> int:
    return 3 * int(layer_seed_) + stream


def basis_chunks(seed: int, num_basis: int, numel: int) -> Iterator[tuple[int, Tensor]]:
    """(start, bases (c, numel)) with every basis ~ U(−1, 1)/√num_basis, drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(num_basis)
    for start in range(0, num_basis, BASIS_CHUNK):
        count = min(BASIS_CHUNK, num_basis - start)
        yield start, torch.empty(count, numel).uniform_(-1.0, 1.0, generator=generator).mul_(scale)


def random_bases(seed: int, num_basis: int, numel: int) -> Tensor:
    """All bases of one stream, (num_basis, numel) fp32 on the CPU."""
    return torch.cat([chunk for _, chunk in basis_chunks(seed, num_basis, numel)])


def kaiming_fixed(seed: int, rows: int, cols: int) -> Tensor:
    """A₀ (rows, cols) ~ U(−1/√cols, 1/√cols): nn.Linear's Kaiming-uniform init (a=√5), seeded."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


class _SeededCombination(torch.autograd.Function):
    """Σ_i c_i · basis_i without keeping the bases: both passes regenerate them from the seed."""

    @staticmethod
    def forward(ctx, coefficients: Tensor, seed: int, rows: int, cols: int) -> Tensor:
        ctx.seed, ctx.numel, ctx.count = seed, rows * cols, len(coefficients)
        coef = coefficients.detach().float()
        out = torch.zeros(rows * cols, device=coefficients.device)
        for start, chunk in basis_chunks(seed, len(coef), rows * cols):
            out += coef[start : start + len(chunk)] @ chunk.to(coefficients.device)
        return out.view(rows, cols).to(coefficients.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # d(Σ c_i basis_i)/dc_i = basis_i, so grad_c_i = <grad, basis_i>: one regenerated chunk at a time.
        flat = grad.reshape(-1).float()
        grads = [chunk.to(grad.device) @ flat for _, chunk in basis_chunks(ctx.seed, ctx.count, ctx.numel)]
        return torch.cat(grads).to(grad.dtype), None, None, None


def combine_bases(coefficients: Tensor, seed: int, rows: int, cols: int) -> Tensor:
    """Σ_i coefficients[i] · basis_i reshaped to (rows, cols), bases regenerated from `seed`."""
    return _SeededCombination.apply(coefficients, seed, rows, cols)


def nola_factors(coef_a: Tensor, coef_b: Tensor, seed: int, rank: int, in_features: int, out_features: int,
                 bases: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """A (rank, in) and B (out, rank) of one layer; `bases` = cached (k, r·in), (l, out·r)."""
    fixed = kaiming_fixed(stream_seed(seed, _FIXED), rank, in_features).to(coef_a.device, coef_a.dtype)
    if bases is not None:
        a = fixed + (coef_a @ bases[0]).view(rank, in_features)
        b = (coef_b @ bases[1]).view(out_features, rank)
        return a, b
    a = fixed + combine_bases(coef_a, stream_seed(seed, _BASES_A), rank, in_features)
    b = combine_bases(coef_b, stream_seed(seed, _BASES_B), out_features, rank)
    return a, b


def nola_delta(coef_a: Tensor, coef_b: Tensor, seed: int, rank: int, in_features: int, out_features: int,
               scaling: float) -> Tensor:
    """ΔW (out, in) = scaling · B · A."""
    a, b = nola_factors(coef_a, coef_b, seed, rank, in_features, out_features)
    return scaling * (b @ a)


# -- the layer ---------------------------------------------------------------------------------


@register_layer
class NolaLinear(CompressedLinear):
    """y = x Wᵀ + b + (α/r) · (x Aᵀ) Bᵀ, with A and B rebuilt from k + l coefficients and a seed.

    The frozen base is `weight` (out, in), or `base_layer` when it is a bitsandbytes-quantized
    linear (QLoRA-style; `load_in`), whose own forward is then used.
    """

    layer_type = "nola"

    def __init__(self, in_features: int, out_features: int, rank: int, num_basis_a: int, num_basis_b: int,
                 alpha: float, seed: int, bias: bool = False, cache_bases: bool = False,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        self.rank, self.alpha, self.seed = rank, float(alpha), int(seed)
        self.num_basis_a, self.num_basis_b, self.cache_bases = num_basis_a, num_basis_b, cache_bases
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.base_layer: nn.Module | None = None
        self.nola_coef_a = nn.Parameter(torch.zeros(num_basis_a, dtype=dtype, device=device))
        self.nola_coef_b = nn.Parameter(torch.zeros(num_basis_b, dtype=dtype, device=device))
        if cache_bases:
            bases_a = random_bases(stream_seed(seed, _BASES_A), num_basis_a, rank * in_features)
            bases_b = random_bases(stream_seed(seed, _BASES_B), num_basis_b, out_features * rank)
            # Non-persistent: regenerated from the seed, never written to a checkpoint.
            self.register_buffer("bases_a", bases_a.to(device=device, dtype=dtype), persistent=False)
            self.register_buffer("bases_b", bases_b.to(device=device, dtype=dtype), persistent=False)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, module: nn.Module, *, rank: int, num_basis_a: int, num_basis_b: int, alpha: float,
                    seed: int, cache_bases: bool = False) -> NolaLinear:
        """Wrap a trained linear (nn.Linear, HF Conv1D or a bitsandbytes linear) as the frozen base."""
        out_f, in_f = linear_shape(module)
        bias = getattr(module, "bias", None)
        quantized = is_quantized(module)
        dtype = torch.float32 if quantized else module.weight.dtype
        layer = cls(in_f, out_f, rank, num_basis_a, num_basis_b, alpha, seed, bias is not None and not quantized,
                    cache_bases, dtype=dtype, device=module.weight.device)
        with torch.no_grad():
            if quantized:
                layer.weight = None
                layer.base_layer = module
            else:
                layer.weight.copy_(base_weight(module).to(dtype))
                if bias is not None:
                    layer.bias.copy_(bias)
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "num_basis_a": self.num_basis_a, "num_basis_b": self.num_basis_b, "alpha": self.alpha,
                "seed": self.seed, "bias": self.bias is not None, "cache_bases": self.cache_bases}

    def factors(self) -> tuple[Tensor, Tensor]:
        """A (rank, in), B (out, rank)."""
        bases = (self.bases_a, self.bases_b) if self.cache_bases else None
        return nola_factors(self.nola_coef_a, self.nola_coef_b, self.seed, self.rank, self.in_features,
                            self.out_features, bases)

    def delta_weight(self) -> Tensor:
        a, b = self.factors()
        return self.scaling * (b @ a)

    def dense_weight(self) -> Tensor:
        weight = base_weight(self.base_layer) if self.base_layer is not None else self.weight
        return weight + self.delta_weight().to(weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.factors()
        if self.base_layer is not None:
            return self.base_layer(x) + self.scaling * nn.functional.linear(nn.functional.linear(x, a.to(x.dtype)),
                                                                            b.to(x.dtype))
        return kernels.lora_linear(x, self.weight, a, b, self.scaling, self.bias)

    def basis_cache_bytes(self) -> int:
        if not self.cache_bases:
            return 0
        return self.bases_a.numel() * self.bases_a.element_size() + self.bases_b.numel() * self.bases_b.element_size()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"num_basis=({self.num_basis_a}, {self.num_basis_b}), seed={self.seed}")


# -- wiring ------------------------------------------------------------------------------------


def install_nola(model: nn.Module, config: NolaConfig, base_seed: int) -> dict[str, NolaLinear]:
    """Replace every selected linear by a NolaLinear (ΔW = 0); returns them by name."""
    modules = select_linears(model, config.targets, config.ignore)
    _refuse_compressed("nola", modules)
    layers = {}
    for name, module in modules.items():
        layers[name] = NolaLinear.from_linear(
            module, rank=config.rank, num_basis_a=config.num_basis_a, num_basis_b=config.num_basis_b,
            alpha=config.alpha, seed=layer_seed(base_seed, name), cache_bases=config.cache_bases)
        replace_module(model, name, layers[name])
    return layers


def _refuse_compressed(method: str, modules: dict[str, nn.Module]) -> None:
    compressed = [n for n, m in modules.items() if isinstance(m, CompressedLinear)]
    if compressed:
        raise ConfigError(
            f"{method}: target `{compressed[0]}` is already a compressed {type(modules[compressed[0]]).__name__} "
            f"({len(compressed)} such layer(s)); adapt plain linears only: add them to `ignore`, or tune the "
            "factors themselves with `welore-tune` / `backprop`"
        )


def coefficient_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith((".nola_coef_a", ".nola_coef_b"))}


def save_nola_adapter(layers: dict[str, NolaLinear], folder: Path) -> dict[str, str]:
    """Coefficients and one seed per layer (int64), plus adapter_config.json; nothing else."""
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{name}.nola_coef_a"] = layer.nola_coef_a
        tensors[f"{name}.nola_coef_b"] = layer.nola_coef_b
        tensors[f"{name}.nola_seed"] = torch.tensor([layer.seed], dtype=torch.int64)
    first = next(iter(layers.values()))
    config = {"method": "nola", "format_version": 1, "rank": first.rank, "alpha": first.alpha,
              "num_basis_a": first.num_basis_a, "num_basis_b": first.num_basis_b, "basis_chunk": BASIS_CHUNK,
              "bases": "U(-1,1)/sqrt(num_basis) from torch.Generator (CPU) seeded 3*seed+{1,2}; "
                       "A0 Kaiming-uniform from 3*seed",
              "target_modules": sorted(layers)}
    return write_adapter(folder, tensors, config, ADAPTER_FILE)


def load_nola_adapter(model: nn.Module, folder: str | Path, *, cache_bases: bool = False) -> dict[str, NolaLinear]:
    """Install a saved NOLA adapter into a fresh copy of its base model (in place)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / ADAPTER_FILE))
    except (OSError, ValueError) as err:
        raise ModelError(f"`{folder}` is not a NOLA adapter folder ({err}); pass the `adapter` folder a nola "
                         "run wrote") from None
    layers = {}
    for name in config["target_modules"]:
        module = model.get_submodule(name)
        layer = NolaLinear.from_linear(module, rank=config["rank"], num_basis_a=config["num_basis_a"],
                                       num_basis_b=config["num_basis_b"], alpha=config["alpha"],
                                       seed=int(tensors[f"{name}.nola_seed"][0]), cache_bases=cache_bases)
        with torch.no_grad():
            layer.nola_coef_a.copy_(tensors[f"{name}.nola_coef_a"])
            layer.nola_coef_b.copy_(tensors[f"{name}.nola_coef_b"])
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


@register("nola", NolaConfig, kind="finetune")
def apply(model: nn.Module, config: NolaConfig, ctx: Context) -> StageResult:
    """Install NOLA on the targets, train only the coefficients, save them, optionally merge."""
    config = with_default_lr(config, adamw=1e-3, mezo=5e-5)
    layers = install_nola(model, config, run_seed(config, ctx))
    params = coefficient_params(model)
    result = fit(model, params, config, ctx, method="nola")
    folder = adapter_folder(ctx)
    artifacts = save_nola_adapter(layers, folder) if folder is not None else {}
    rows = [_row(name, layer) for name, layer in layers.items()]
    if config.merge:
        for name, layer in layers.items():
            replace_module(model, name, layer.to_linear())
    lora_equivalent = sum(r["lora_params_same_rank"] for r in rows)
    stage = result.stage_result(metrics={
        **param_metrics(model, count_params(params)), "adapted_layers": len(layers),
        "lora_params_same_rank": lora_equivalent,
        "fraction_of_lora_same_rank": count_params(params) / max(lora_equivalent, 1),
        "basis_cache_bytes": sum(layer.basis_cache_bytes() for layer in layers.values()),
        "adapter_file_bytes": Path(artifacts["adapter"]).stat().st_size if artifacts else 0,
        "merged": config.merge})
    stage.per_module, stage.artifacts = rows, artifacts
    return stage


def _row(name: str, layer: NolaLinear) -> dict[str, Any]:
    return {"module": name, "shape": [layer.out_features, layer.in_features], "seed": layer.seed,
            "trainable": layer.num_basis_a + layer.num_basis_b,
            "lora_params_same_rank": layer.rank * (layer.in_features + layer.out_features),
            "delta_norm": float(layer.delta_weight().detach().norm())}

"""The integer grid of weight-only quantization, shared by `rtn` and `gptq` (METHODS.md §17.1).

Per group of g consecutive input columns of one output row (g divides in_features; g =
in_features is per-channel), unsigned b-bit codes c ∈ [0, 2^b − 1]:

* symmetric (llm-compressor / compressed-tensors convention): s = max|w| / ((2^b − 1) / 2),
  c = clamp(round(w / s) + 2^(b−1)), ŵ = s·(c − 2^(b−1)); the signed code q = c − 2^(b−1) lies
  in [−2^(b−1), 2^(b−1) − 1];
* asymmetric: with lo = min(min w, 0), hi = max(max w, 0) (so 0 is on the grid),
  s = (hi − lo) / (2^b − 1), integer zero point z = clamp(round(−lo / s)), c = clamp(round(w / s + z)),
  ŵ = s·(c − z).

Scales are rounded to the storage dtype before the codes are chosen, so the stored (codes,
scales) reproduce exactly the weight the method measured; rtn keeps, of the storable scales next
to the ideal one, the one with the least squared error per group (`_stored_candidates`; gptq the
nearest). Also here: the config fields both methods share, the checks every quantize stage runs on
its targets, the input embedding's quantization, and the layer-report row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..configs.quant import QuantFields  # noqa: F401  (the config, declared there; re-exported)
from ..errors import ConfigError, ModelError
from ..kernels.packing import expand_nm_indices, pack_int, unpack_nm
from ..layers import (
    CompressedLinear,
    LowRankLinear,
    NMSparseLinear,
    QuantEmbedding,
    QuantLinear,
    QuantLowRankLinear,
    QuantNMLinear,
    QuantTiedHead,
    link_quantized_embeddings,
)
from ..offload import materialized
from ..targeting import layer_type, linear_shape, linear_weight, replace_module

__all__ = ["Grid", "QuantFields", "check_embedding", "check_targets", "embedding_grid", "factor_grids",
           "group_params", "quantize_codes", "quantize_embedding", "rtn_quantize"]


@dataclass(frozen=True)
class Grid:
    """One layer's grid: code width, group size (resolved: divides the columns), symmetry, and
    the dtype the scales are stored in."""

    bits: int
    group_size: int
    symmetric: bool
    dtype: torch.dtype

    @property
    def top(self) -> int:
        return 2**self.bits - 1

    def scales_and_zeros(self, groups: Tensor, least_error: bool = True) -> tuple[Tensor, Tensor | None]:
        return group_params(groups, self.bits, self.symmetric, self.dtype, least_error)


def group_params(groups: Tensor, bits: int, symmetric: bool, dtype: torch.dtype,
                 least_error: bool = True) -> tuple[Tensor, Tensor | None]:
    """Scales (and zero points) of groups (..., g) -> scales (...) in groups.dtype, already rounded
    to `dtype` (`least_error`: the storable neighbour with the least squared error of these values,
    else the nearest); zeros (...) float integers in [0, 2^b − 1], or None when symmetric."""
    top = 2**bits - 1
    lo = groups.amin(-1).clamp(max=0)
    hi = groups.amax(-1).clamp(min=0)
    eps = torch.finfo(torch.float32).eps
    ideal = (torch.maximum(-lo, hi) / (top / 2) if symmetric else (hi - lo) / top).clamp(min=eps)
    candidates = _stored_candidates(ideal, dtype)[:None if least_error else 1]
    choices = [_grid_choice(groups, s.to(groups.dtype), lo, bits, symmetric) for s in candidates]
    pick = torch.stack([error for _, _, error in choices]).argmin(0, keepdim=True)  # ties: the nearest
    scales = torch.stack([s for s, _, _ in choices]).gather(0, pick)[0]
    if symmetric:
        return scales, None
    return scales, torch.stack([z for _, z, _ in choices]).gather(0, pick)[0]


def _grid_choice(groups: Tensor, scales: Tensor, lo: Tensor, bits: int,
                 symmetric: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(scales, zeros, each group's squared rounding error) of one candidate scale per group."""
    zeros = None if symmetric else (-lo / scales).round().clamp(0, 2**bits - 1)
    offset = None if zeros is None else zeros.unsqueeze(-1)
    codes = quantize_codes(groups, scales.unsqueeze(-1), offset, bits)
    error = (dequantize_codes(codes, scales.unsqueeze(-1), offset, bits) - groups).square().sum(-1)
    return scales, zeros, error


def _stored_candidates(ideal: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """The storable scales around the ideal one: the nearest in `dtype` and its neighbours one unit
    in the last place either side (group_params keeps, per group, the one with the least squared
    error, codes chosen against it as stored). Rounding a bfloat16 scale to nearest moves a whole
    group's grid by up to 0.4 %: int4 g64 RTN of SmolLM2 held in bfloat16 measured perplexity 46.87
    that way and 44.95 with this choice (llm-compressor, float32 scales: 44.96), at no byte cost.
    GPTQ takes the nearest: it fixes a group's scale before its error feedback changes the group's
    later columns, so the least error on the values at hand is not the error it ends with (int4 g64
    on SmolLM2: 41.63 nearest, 42.29 least-error). Kept positive: a tiny scale must not round to 0."""
    nearest = ideal.to(dtype)
    nearest = torch.where(nearest > 0, nearest, torch.finfo(dtype).tiny)
    if torch.finfo(dtype).bits >= torch.finfo(ideal.dtype).bits:  # stored as computed: nothing to choose
        return [nearest]
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    down = torch.nextafter(nearest, torch.zeros_like(nearest))
    return [nearest, up, torch.where(down > 0, down, nearest)]


def quantize_codes(values: Tensor, scales: Tensor, zeros: Tensor | None, bits: int) -> Tensor:
    """Codes (float, integer-valued) of `values` on the grid (scales, zeros broadcast to values)."""
    offset = 2 ** (bits - 1) if zeros is None else zeros
    return (values / scales + offset).round().clamp(0, 2**bits - 1)


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int) -> Tensor:
    offset = 2 ** (bits - 1) if zeros is None else zeros
    return scales * (codes - offset)


def rtn_quantize(weight: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round to nearest: W (out, in) -> (codes uint8 (out, in), scales (out, in/g) in grid.dtype,
    zeros uint8 (out, in/g) or None)."""
    out_f, in_f = weight.shape
    groups = weight.detach().float().reshape(out_f, in_f // grid.group_size, grid.group_size)
    scales, zeros = grid.scales_and_zeros(groups)
    zero_cols = None if zeros is None else zeros.unsqueeze(-1)
    codes = quantize_codes(groups, scales.unsqueeze(-1), zero_cols, grid.bits).reshape(out_f, in_f)
    return codes.to(torch.uint8), scales.to(grid.dtype), None if zeros is None else zeros.to(torch.uint8)


def quant_layer(codes: Tensor, scales: Tensor, zeros: Tensor | None, grid: Grid, bias: Tensor | None,
                correction: tuple[Tensor, Tensor] | None = None) -> QuantLinear:
    """The QuantLinear storing these codes packed, on the scales' device."""
    return QuantLinear.from_codes(pack_int(codes, grid.bits), scales, zeros, grid.bits, grid.group_size,
                                  codes.shape[1], bias, correction)


def resolve_group(group_size: int, in_features: int) -> int:
    return in_features if group_size == 0 else group_size


def layer_grid(config: QuantFields, weight: Tensor) -> Grid:
    """The grid of one (out, in) matrix: the config's, per-channel when group_size is 0."""
    return Grid(config.bits, resolve_group(config.group_size, weight.shape[1]), config.symmetric, weight.dtype)


def factor_grids(config: QuantFields, module: LowRankLinear) -> tuple[Grid, Grid]:
    """(V's grid, U's grid) of a low-rank layer: V grouped along in_features as configured, U along
    the rank with the same group size when it divides the rank, else per-channel."""
    v_grid = layer_grid(config, module.v)
    rank = module.rank
    u_group = config.group_size if config.group_size and rank % config.group_size == 0 else rank
    return v_grid, Grid(config.bits, u_group, config.symmetric, module.u.dtype)


def nm_grids(config: QuantFields, module: NMSparseLinear) -> tuple[Grid, Grid]:
    """(grid of the kept values, the same grid over dense columns) of an N:M layer: a group of g
    kept values covers g·m/n consecutive columns (g a multiple of n: whole N:M groups)."""
    slots = module.in_features // module.m * module.n
    group = config.group_size or slots
    dtype = module.values.dtype
    return (Grid(config.bits, group, config.symmetric, dtype),
            Grid(config.bits, group // module.n * module.m, config.symmetric, dtype))


def nm_keep_mask(module: NMSparseLinear) -> Tensor:
    """bool (out, in): the positions an N:M layer stores (padding slots included)."""
    ones = torch.ones_like(module.values)
    return unpack_nm(ones, module.indices, module.n, module.m, module.in_features) > 0


def nm_slots(codes: Tensor, module: NMSparseLinear) -> Tensor:
    """The entries of a dense (out, in) tensor at the layer's stored positions, in slot order."""
    slots = module.in_features // module.m * module.n
    positions = expand_nm_indices(module.indices, module.n, module.m, slots).long()
    columns = torch.arange(slots, device=codes.device) // module.n * module.m + positions
    return codes.gather(1, columns)


def quant_nm(codes: Tensor, scales: Tensor, zeros: Tensor | None, module: NMSparseLinear, grid: Grid) -> QuantNMLinear:
    """The QuantNMLinear of quantized kept values (codes in slot order), positions unchanged."""
    return QuantNMLinear.from_codes(pack_int(codes, grid.bits), scales, zeros, module.indices, module.n, module.m,
                                    grid.bits, grid.group_size, module.in_features, module.bias)


def quant_low_rank(u: tuple, v: tuple, u_grid: Grid, v_grid: Grid, bias: Tensor | None) -> QuantLowRankLinear:
    """The QuantLowRankLinear of quantized factors u, v = (codes, scales, zeros) each."""
    return QuantLowRankLinear.from_factors(quant_layer(*u, u_grid, None), quant_layer(*v, v_grid, None), bias)


def round_to_nearest(name: str, module: nn.Module, config: QuantFields, rows: list[dict[str, Any]],
                     **extra: Any) -> nn.Module:
    """One linear (both factors of a low-rank layer) rounded to nearest; appends the report row."""
    weight = linear_weight(module).detach()
    bias = getattr(module, "bias", None)
    if isinstance(module, NMSparseLinear):
        grid, _ = nm_grids(config, module)
        layer = quant_nm(*rtn_quantize(module.values.detach(), grid), module, grid)
    elif isinstance(module, LowRankLinear):
        v_grid, u_grid = factor_grids(config, module)
        u, v = rtn_quantize(module.u.detach(), u_grid), rtn_quantize(module.v.detach(), v_grid)
        layer = quant_low_rank(u, v, u_grid, v_grid, bias)
    else:
        grid = layer_grid(config, weight)
        layer = quant_layer(*rtn_quantize(weight, grid), grid, bias)
    rows.append(quant_row(name, weight, layer, **extra))
    return layer


def check_targets(method: str, selected: dict[str, nn.Module], group_size: int) -> None:
    """ConfigError, before anything changes, for a target already quantized, a compressed kind this
    method cannot quantize, or a group size that does not divide in_features."""
    for name, module in selected.items():
        if isinstance(module, (QuantLinear, QuantLowRankLinear, QuantNMLinear, QuantTiedHead)):
            bits = f"{module.embedding.bits} bits, the embedding's codes" if isinstance(module, QuantTiedHead) \
                else f"{module.bits} bits"
            raise ConfigError(f"{method}: `{name}` is already quantized ({bits}); quantize each "
                              "layer once: drop this stage or add the layer to `ignore`")
        if isinstance(module, CompressedLinear) and not isinstance(module, (LowRankLinear, NMSparseLinear)):
            raise ConfigError(f"{method}: `{name}` is a `{module.layer_type}` layer, which {method} cannot "
                              "quantize yet; quantize before that stage or add it to `ignore`")
    bad = [f"{n} ({_grouped_width(m)})" for n, m in selected.items() if group_size and _misfit(m, group_size)]
    if bad:
        raise ConfigError(f"{method}: `group_size`={group_size} does not divide in_features of {len(bad)} "
                          f"layer(s): {', '.join(bad[:4])}; choose a divisor or `group_size: 0` (per-channel)")
    for name, module in selected.items():
        with materialized(module):  # an offloaded weight is read from where accelerate keeps it
            _check_finite(method, name, linear_weight(module))


def _check_finite(method: str, name: str, weight: Tensor) -> None:
    """NaN / Inf would become NaN scales in the checkpoint: refuse before anything changes."""
    if not torch.isfinite(weight.detach()).all():
        raise ModelError(f"{method}: `{name}` holds NaN/Inf weights, which cannot be quantized; restore the "
                         "original weights (the model or checkpoint is corrupt)")


# -- the input embedding and its (tied) output head ------------------------------------------------


def check_embedding(method: str, model: nn.Module, config: QuantFields) -> nn.Embedding | None:
    """The input embedding `embedding_bits` asks to quantize (None when 0); ConfigError, before
    anything changes, when there is none, it is already quantized, or the group does not fit."""
    if not config.embedding_bits:
        return None
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, QuantEmbedding):
        raise ConfigError(f"{method}: the input embedding is already quantized ({embedding.bits} bits); quantize "
                          "it once: drop `embedding_bits` from this stage")
    if type(embedding) is not nn.Embedding:
        raise ConfigError(f"{method}: `embedding_bits` needs a plain nn.Embedding input embedding, but this model has "
                          f"{type(embedding).__name__}; drop `embedding_bits`")
    hidden = embedding.embedding_dim
    group = _embedding_group(config, hidden)
    if hidden % group:
        raise ConfigError(f"{method}: `embedding_group_size`={group} does not divide the embedding dim {hidden}; "
                          "choose a divisor or `embedding_group_size: 0` (one group per row)")
    with materialized(embedding):
        _check_finite(method, "the input embedding", embedding.weight)
    return embedding


def _embedding_group(config: QuantFields, hidden: int) -> int:
    group = config.group_size if config.embedding_group_size is None else config.embedding_group_size
    return resolve_group(group, hidden)


def embedding_grid(config: QuantFields, weight: Tensor) -> Grid:
    return Grid(config.embedding_bits, _embedding_group(config, weight.shape[1]), config.symmetric, weight.dtype)


def quantize_embedding(model: nn.Module, embedding: nn.Embedding, config: QuantFields, skip: set[str],
                       rows: list[dict[str, Any]], codes: tuple | None = None) -> None:
    """Round the input embedding to nearest on its grid (or store the given (codes, scales,
    zeros)). A tied lm_head (`tie_word_embeddings`, the same weight) becomes a QuantTiedHead
    reading the same codes; an untied nn.Linear lm_head not in `skip` (the linears the stage
    quantizes itself) is quantized on the same grid."""
    weight = embedding.weight.detach()
    grid = embedding_grid(config, weight)
    codes, scales, zeros = rtn_quantize(weight, grid) if codes is None else codes
    layer = QuantEmbedding.from_codes(pack_int(codes, grid.bits), scales, zeros, grid.bits, grid.group_size,
                                      weight.shape[1])
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) and \
        getattr(head, "weight", None) is embedding.weight
    replace_module(model, names[id(embedding)], layer)
    rows.append(quant_row(names[id(embedding)], weight, layer, solver="rtn"))
    if tied:
        replace_module(model, names[id(head)], QuantTiedHead(weight.shape[1], weight.shape[0]))
    elif type(head) is nn.Linear and names.get(id(head)) not in skip:
        head_grid = Grid(grid.bits, grid.group_size, grid.symmetric, head.weight.dtype)
        quantized = quant_layer(*rtn_quantize(head.weight.detach(), head_grid), head_grid, head.bias)
        replace_module(model, names[id(head)], quantized)
        rows.append(quant_row(names[id(head)], head.weight.detach(), quantized, solver="rtn"))
    link_quantized_embeddings(model)


def _grouped_width(module: nn.Module) -> str:
    if isinstance(module, NMSparseLinear):
        return f"{module.in_features // module.m * module.n} kept values per row, N={module.n}"
    return f"in_features={linear_shape(module)[1]}"


def _misfit(module: nn.Module, group_size: int) -> bool:
    """True when groups of `group_size` do not tile the quantized rows (for N:M: the kept values,
    in whole N:M groups)."""
    if isinstance(module, NMSparseLinear):
        return (module.in_features // module.m * module.n) % group_size != 0 or group_size % module.n != 0
    return linear_shape(module)[1] % group_size != 0


def quant_row(name: str, weight: Tensor, layer: QuantLinear | QuantLowRankLinear, **extra: Any) -> dict[str, Any]:
    """The per-module report row: shape, grid, stored bytes (as the checkpoint stores them)."""
    out_f, in_f = weight.shape
    dense_bytes = out_f * in_f * weight.element_size()
    stored = sum(t.numel() * (t.element_size() if not t.is_floating_point() else weight.element_size())
                 for key, t in layer.state_dict().items() if key != "bias")
    quantized = layer.dense_weight().detach().float()
    return {"module": name, "type": layer_type(name), "shape": f"{out_f}x{in_f}", "bits": layer.bits,
            "group_size": layer.group_size, "dense_bytes": dense_bytes, "stored_bytes": stored,
            "keep_bytes": round(stored / dense_bytes, 4),
            "relative_error": float((weight.float() - quantized).norm() / weight.float().norm().clamp_min(1e-30)),
            **extra}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    dense = sum(r["dense_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    metrics = {"layers": len(rows), "stored_bytes": stored, "dense_bytes": dense,
               "keep_ratio_bytes": round(stored / max(dense, 1), 4),
               "mean_relative_error": round(sum(r["relative_error"] for r in rows) / max(len(rows), 1), 6)}
    calibrated = [r["output_error"] for r in rows if "output_error" in r]
    if calibrated:
        metrics["output_error"] = round(sum(calibrated) / len(calibrated), 6)
    return metrics

"""Byte-budgeted quantization formats (`target_bytes`, gptq): bits, group size and correction rank
per matrix, chosen by measured loss per byte under a budget on the checkpoint's bytes on disk.

The budget is a fraction of the dense checkpoint's model.safetensors in bfloat16 (every stored
tensor, embeddings included, a tied lm_head once, the safetensors header too), so 0.3 means "at
most 30 % of what the dense bf16 file takes". The allocation works like `allocation: aware`
(`_lowrank_allocation`), with formats in place of ranks:

1. Bytes are predicted exactly, before anything is quantized: each planned layer is built on the
   meta device, so its state dict names every tensor the checkpoint will hold (packed codes,
   scales in the checkpoint dtype, corrections, bias), beside every tensor that is not
   quantized; `safetensors_bytes` adds the header as safetensors writes it. A budget below the
   smallest option of every matrix is refused from shapes alone, before any calibration.
2. One calibration pass over the dense model gives each targeted matrix's Hessian H = E[x xᵀ],
   and `output_fisher` the mean squared loss gradient at its output. The loss of a format is the
   fisher-weighted calibration output error of the round-to-nearest weight,
   f · tr((W − Ŵ) H (W − Ŵ)ᵀ); a rank-r correction (the whitened SVD of W − Ŵ) removes the r
   largest σ² of (W − Ŵ)·L, H = L Lᵀ, exactly. RTN prices the formats (one cheap rounding per
   option); the stage then runs GPTQ at the chosen formats, whose error is lower at every format.
3. `allocate_options` (the aware greedy) buys, from each matrix's cheapest option, steps along
   its lower convex hull of (bytes, loss) by loss removed per byte until the budget is spent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..calibration import calibration_windows
from ..ckpt_format import IMPORT_HINT
from ..errors import ConfigError
from ..layers import QuantEmbedding, QuantLinear, QuantTiedHead, compressed_layers
from ..numerics import cholesky_with_shift
from ..offload import materialized
from ..targeting import linear_shape, linear_weight
from ._lowrank_allocation import FISHER_WINDOWS, allocate_options, dense_layer_stats, output_fisher
from ._quant_grid import Grid, dequantize_codes, resolve_group, rtn_quantize

__all__ = ["Format", "allocate_formats", "embedding_head", "format_losses", "format_options", "planned_bytes", "safetensors_bytes"]

# safetensors writes tensors sorted by dtype (its enum order, descending), then by name.
_ST_DTYPES = {torch.bool: ("BOOL", 0), torch.uint8: ("U8", 1), torch.int8: ("I8", 2), torch.int16: ("I16", 3),
              torch.float16: ("F16", 4), torch.bfloat16: ("BF16", 5), torch.int32: ("I32", 6),
              torch.float32: ("F32", 7), torch.float64: ("F64", 8), torch.int64: ("I64", 9)}


@dataclass(frozen=True, order=True)
class Format:
    """One matrix's storage: b-bit codes in groups of `group_size` input columns (resolved:
    in_features for per-channel), plus a rank-`rank` correction (0 = none)."""

    bits: int
    group_size: int
    rank: int = 0

    @property
    def label(self) -> str:
        return f"int{self.bits} g{self.group_size}" + (f" r{self.rank}" if self.rank else "")


def format_options(shape: tuple[int, int], bits: Iterable[int], groups: Iterable[int],
                   ranks: Iterable[int]) -> list[Format]:
    """The formats a (out, in) matrix can take: group sizes that divide in_features (0 =
    per-channel), correction ranks below min(out, in); duplicates (g64 on 64 columns is
    per-channel) once."""
    out_f, in_f = shape
    sizes = sorted({resolve_group(g, in_f) for g in groups if g == 0 or in_f % g == 0})
    return sorted({Format(b, g, r) for b in bits for g in sizes for r in ranks if r < min(out_f, in_f)})


def planned_layer(module: nn.Module, fmt: Format, dtype: torch.dtype, tied: bool = False) -> nn.Module:
    """The layer `module` becomes at `fmt`, on the meta device (shapes and dtypes only): a
    QuantEmbedding for the input embedding, a QuantTiedHead (no tensors) for a head `tied` to
    it, a QuantLinear otherwise."""
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(module.embedding_dim, module.num_embeddings, fmt.bits, fmt.group_size, True,
                              dtype=dtype, device="meta")
    out_f, in_f = linear_shape(module)
    if tied:
        return QuantTiedHead(in_f, out_f, dtype=dtype, device="meta")
    return QuantLinear(in_f, out_f, fmt.bits, fmt.group_size, True, getattr(module, "bias", None) is not None,
                       fmt.rank, dtype=dtype, device="meta")


def embedding_head(model: nn.Module) -> tuple[str | None, str | None, bool]:
    """(input embedding's name, output head's name, whether the head is tied to it); None where
    the model has none. An untied head is quantized on the embedding's grid (as `embedding_bits`
    does), so a plan for the embedding covers the head too."""
    names = {id(m): n for n, m in model.named_modules()}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", False)
    return names.get(id(embedding)), names.get(id(head)), tied


def unit_layers(model: nn.Module, name: str, fmt: Format, dtype: torch.dtype) -> dict[str, nn.Module]:
    """{module name: planned layer} of one allocation unit: a linear, or the input embedding with
    its output head (tied: a QuantTiedHead; an untied nn.Linear: quantized on the same grid)."""
    modules = dict(model.named_modules())
    layers = {name: planned_layer(modules[name], fmt, dtype)}
    embedding, head, tied = embedding_head(model)
    if name == embedding and head is not None and (tied or type(modules[head]) is nn.Linear):
        layers[head] = planned_layer(modules[head], Format(fmt.bits, fmt.group_size), dtype, tied=tied)
    return layers


def tensor_bytes(tensor: Tensor, dtype: torch.dtype) -> int:
    """Bytes of one tensor in the checkpoint: floats in `dtype`, integers at their own width."""
    return tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())


def layer_bytes(model: nn.Module, name: str, fmt: Format, dtype: torch.dtype) -> int:
    """Bytes the tensors of unit `name` at `fmt` take in the checkpoint (header excluded)."""
    return sum(tensor_bytes(t, dtype) for layer in unit_layers(model, name, fmt, dtype).values()
               for t in layer.state_dict().values())


def planned_entries(model: nn.Module, formats: Mapping[str, Format], dtype: torch.dtype) -> dict[str, tuple]:
    """{key: (dtype, shape)} of the checkpoint the model would write with `formats[name]` for
    each named unit: tensors shared in memory (a tied lm_head) once, under the first name; the
    empty `.weight` placeholders and the import hint that compressed layers bring."""
    planned: dict[str, nn.Module] = {}
    for name, fmt in formats.items():
        planned.update(unit_layers(model, name, fmt, dtype))
    entries: dict[str, tuple] = {}
    seen: set[tuple] = set()
    for key, tensor in model.state_dict().items():
        if key.rsplit(".", 1)[0] in planned:
            continue
        shared = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if shared is not None and shared in seen:
            continue
        seen.add(shared)
        entries[key] = (dtype if tensor.is_floating_point() else tensor.dtype, tuple(tensor.shape))
    layers: dict[str, nn.Module] = {**compressed_layers(model), **planned}
    for name, layer in planned.items():
        for key, tensor in layer.state_dict().items():
            entries[f"{name}.{key}"] = (tensor.dtype, tuple(tensor.shape))
    for name, layer in layers.items():  # ckpt_format.placeholder_names, without materialising anything
        if "weight" not in layer.state_dict():
            entries[f"{name}.weight"] = (dtype, (0,))
    if layers:
        entries[IMPORT_HINT] = (dtype, (0,))
    return entries


def safetensors_bytes(entries: Mapping[str, tuple], metadata: Mapping[str, str] | None = None) -> int:
    """The size of the .safetensors file holding tensors {name: (dtype, shape)}: 8 bytes of
    header length, the JSON header (compact, padded with spaces to a multiple of 8), the data."""
    order = sorted(entries, key=lambda k: (-_ST_DTYPES[entries[k][0]][1], k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        dtype, shape = entries[key]
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": _ST_DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    length = len(text.encode()) + (-len(text.encode())) % 8
    return 8 + length + offset


CHECKPOINT_METADATA = {"format": "pt"}  # what transformers' save_pretrained stores in the header


def planned_bytes(model: nn.Module, formats: Mapping[str, Format], dtype: torch.dtype) -> int:
    """model.safetensors' exact size for these formats (see `planned_entries`)."""
    return safetensors_bytes(planned_entries(model, formats, dtype), CHECKPOINT_METADATA)


def dense_reference_bytes(model: nn.Module) -> int:
    """The dense bfloat16 checkpoint's model.safetensors size: what `target_bytes` is a fraction of.
    Compressed layers already in the model count at their dense bf16 weight (out·in·2 bytes)."""
    entries = planned_entries(model, {}, torch.bfloat16)
    for name, layer in compressed_layers(model).items():
        for key in [k for k in entries if k.startswith(f"{name}.")]:
            del entries[key]
        out_f, in_f = linear_shape(layer)
        entries[f"{name}.weight"] = (torch.bfloat16, (out_f, in_f))
        if getattr(layer, "bias", None) is not None:
            entries[f"{name}.bias"] = (torch.bfloat16, (out_f,))
    entries.pop(IMPORT_HINT, None)
    return safetensors_bytes(entries, CHECKPOINT_METADATA)


# -- losses ------------------------------------------------------------------------------------


@torch.no_grad()
def format_losses(weight: Tensor, hessian: Tensor, formats: list[Format], weight_factor: float = 1.0) -> list[float]:
    """The calibration output error f·tr(ΔW H ΔWᵀ) of each format, ΔW = W − Ŵ with Ŵ the
    round-to-nearest weight and the rank-r whitened-SVD correction of ΔW taken off (exact: the
    r largest σ² of ΔW·L, H = L Lᵀ). One rounding and (with ranks) one SVD per (bits, group)."""
    h = hessian.double()
    chol = cholesky_with_shift(hessian)[0].double() if any(f.rank for f in formats) else None
    spectra: dict[tuple[int, int], tuple[float, Tensor | None]] = {}
    losses = []
    for fmt in formats:
        key = (fmt.bits, fmt.group_size)
        if key not in spectra:
            delta = weight.double() - rtn_weight(weight, Grid(fmt.bits, fmt.group_size, True, weight.dtype))
            error = float(((delta @ h) * delta).sum())
            # float32 singular values: ranking options needs σ² to a few digits, not fp64's (3x the time)
            energy = None if chol is None else torch.linalg.svdvals((delta @ chol).float()).double().square().cumsum(0)
            spectra[key] = (error, energy)
        error, energy = spectra[key]
        removed = float(energy[fmt.rank - 1]) if fmt.rank else 0.0
        losses.append(weight_factor * max(error - removed, 0.0))
    return losses


def rtn_weight(weight: Tensor, grid: Grid) -> Tensor:
    """The dequantized round-to-nearest weight on `grid`, fp64."""
    codes, scales, _ = rtn_quantize(weight, grid)
    groups = codes.double().reshape(weight.shape[0], -1, grid.group_size)
    return dequantize_codes(groups, scales.double().unsqueeze(-1), None, grid.bits).reshape(weight.shape)


def allocate_formats(options: Mapping[str, list[tuple[Format, int, float]]], budget: int) -> dict[str, Format]:
    """{name: [(format, bytes, loss)]} -> {name: format} minimising Σ loss within `budget` bytes:
    options sorted by bytes, those no better than a cheaper one dropped, then the aware greedy
    (`allocate_options`). Raises ValueError when the cheapest options exceed the budget."""
    useful = {}
    for name, rows in options.items():
        kept: list[tuple[Format, int, float]] = []
        for row in sorted(rows, key=lambda r: (r[1], r[2])):
            if not kept or row[2] < kept[-1][2]:
                kept.append(row)
        useful[name] = kept
    return allocate_options(useful, budget)


# -- the plan a quantize stage runs ------------------------------------------------------------


@dataclass(frozen=True)
class BytePlan:
    """The chosen format per matrix, the budget and the predicted file size (bytes)."""

    formats: dict[str, Format]
    budget: int
    predicted: int
    dense: int
    losses: dict[str, float]


def check_budget(model: nn.Module, options: Mapping[str, list[Format]], target: float, dtype: torch.dtype,
                 method: str) -> tuple[int, int]:
    """(budget bytes, dense bf16 bytes); ConfigError when even the cheapest format of every
    unit exceeds target·dense (from shapes alone: nothing has been computed yet)."""
    dense = dense_reference_bytes(model)
    budget = int(target * dense)
    cheapest = {n: min(opts, key=lambda f, n=n: layer_bytes(model, n, f, dtype)) for n, opts in options.items()}
    floor = planned_bytes(model, cheapest, dtype)
    if floor > budget:
        raise ConfigError(f"{method}: `target_bytes`={target:g} is {budget} bytes, but the smallest formats on offer "
                          f"({', '.join(sorted({f.label for f in cheapest.values()}))}) already take {floor} "
                          f"({floor / dense:.4f} of the dense bf16 {dense}); raise `target_bytes` to at least "
                          f"{floor / dense:.4f}, or offer fewer bits / larger groups")
    return budget, dense


def plan_formats(model: nn.Module, selected: Mapping[str, nn.Module], options: Mapping[str, list[Format]],
                 target: float, dtype: torch.dtype, config, ctx, notes: list[str]) -> BytePlan:
    """Formats for every unit of `options` (the selected linears, and the input embedding when
    offered) under target·(dense bf16 bytes): dense-model Hessians and output Fisher weights (one
    pass each), RTN losses of every option, the greedy per byte. The embedding is priced by its
    error as the output head (the head's input Hessian and Fisher weight); units with one option
    or without calibration inputs (linears outside the blocks) keep their first option."""
    budget, dense = check_budget(model, options, target, dtype, config.method_name)
    hessians: dict[str, Tensor] = {}

    def consume(linears: dict[str, nn.Module], stats: dict) -> None:
        for name in linears:
            hessians[name] = stats[name].second_moment().detach().cpu()

    notes.extend(dense_layer_stats(model, dict(selected), config, ctx, consume))
    modules = dict(model.named_modules())
    embedding, head, _ = embedding_head(model)
    scored = {n: modules[n] for n in hessians}
    if embedding in options and len(options[embedding]) > 1 and head is not None:
        hessians[embedding] = head_second_moment(model, modules[head], config, ctx)
        scored[embedding] = modules[head]  # its Fisher weight: the head output's (the logits)
    fisher, fisher_note = output_fisher(model, scored, config, ctx)
    notes.append(fisher_note)
    fixed = {n: options[n][0] for n in options if n not in hessians}
    # Every byte but the allocated units' own tensors, with the header of the largest plan (more
    # tensors and longer offsets than any other), so what the greedy buys never overshoots.
    largest = {**fixed, **{n: max(options[n], key=lambda f, n=n: layer_bytes(model, n, f, dtype)) for n in hessians}}
    rest = planned_bytes(model, largest, dtype) - sum(layer_bytes(model, n, f, dtype) for n, f in largest.items())
    priced = {}
    for name, hessian in hessians.items():
        with materialized(modules[name]):
            weight = (modules[name].weight if name == embedding else linear_weight(modules[name])).detach().cpu()
        losses = format_losses(weight, hessian, options[name], float(fisher[name]))
        priced[name] = [(f, layer_bytes(model, name, f, dtype), loss) for f, loss in zip(options[name], losses)]
    spend = budget - rest - sum(layer_bytes(model, n, f, dtype) for n, f in fixed.items())
    try:
        chosen = {**fixed, **allocate_formats(priced, spend)}
    except ValueError:  # only within a header's few bytes of the floor check_budget passed
        raise ConfigError(f"{config.method_name}: `target_bytes`={target:g} leaves no room beyond the smallest "
                          "formats; raise `target_bytes` a little") from None
    predicted = planned_bytes(model, chosen, dtype)
    for _ in range(SLACK_ROUNDS):  # the largest plan's header was a bound: spend what the real one leaves
        spend = budget - (predicted - sum(layer_bytes(model, n, f, dtype) for n, f in chosen.items()))
        wider = {**fixed, **allocate_formats(priced, spend)}
        if wider == chosen or planned_bytes(model, wider, dtype) > budget:
            break
        chosen, predicted = wider, planned_bytes(model, wider, dtype)
    losses = {n: next(loss for f, _, loss in priced[n] if f == chosen[n]) for n in priced}
    return BytePlan(chosen, budget, predicted, dense, losses)


SLACK_ROUNDS = 4  # re-allocations that hand back header bytes the bound over-reserved


@torch.no_grad()
def head_second_moment(model: nn.Module, head: nn.Module, config, ctx) -> Tensor:
    """E[h hᵀ] of the output head's input h over the first FISHER_WINDOWS calibration windows
    (the dense model, one window per forward pass)."""
    total, tokens = None, 0

    def accumulate(_module, args, _output) -> None:
        nonlocal total, tokens
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        total = x.T @ x if total is None else total + x.T @ x
        tokens += x.shape[0]

    handle = head.register_forward_hook(accumulate)
    try:
        for window in calibration_windows(config, ctx)[0][:FISHER_WINDOWS]:
            model(input_ids=window[None].to(ctx.device), use_cache=False)
    finally:
        handle.remove()
    return (total / max(tokens, 1)).float()

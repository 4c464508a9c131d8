"""gptq: weight-only quantization with second-order error feedback (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv 2210.17323).

Columns are rounded to the grid (METHODS.md §17.1, `_quant_grid`) left to right, and each
column's rounding error is fed into the columns not yet quantized by the Optimal Brain Surgeon
update over H = XᵀX (dampened by `dampening`·mean diag H) — the same lazy-block sweep as SparseGPT
(`_obs.obs_sweep`); only the per-column operation differs (§17.2). A group's scale (and zero
point) is fixed when its first column is reached, from the columns as updated so far; with
`act_order` columns are visited by descending diag(H) and the group parameters come from the
original weight (static groups, as llm-compressor does), so codes stay in storage order.

Runs on the calibration engine like sparsegpt: block by block, each block calibrated on the
outputs of the already-quantized blocks before it (offloadable). `correction_rank` r > 0 adds
W ≈ Q + U·V with U·V the rank-r SVD-LLM-whitened SVD of the residual W − Q (§17.3; the whitening
code is svd-llm's), which minimises the residual's calibration output error.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..calibration import CalibrationHooks, LayerStats, compress_blocks
from ..configs.gptq import GPTQConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..layers import CompressedLinear, LowRankLinear, NMSparseLinear
from ..numerics import cholesky_with_shift
from ..registry import register
from ..report.records import StageResult
from ..targeting import linear_shape, linear_weight, select_linears
from ._obs import inverse_hessian_factor, obs_sweep, output_error
from ._quant_grid import (
    Grid,
    check_embedding,
    check_targets,
    embedding_grid,
    dequantize_codes,
    factor_grids,
    layer_grid,
    nm_grids,
    nm_keep_mask,
    nm_slots,
    quant_layer,
    quant_low_rank,
    quant_nm,
    quant_row,
    quantize_codes,
    quantize_embedding,
    round_to_nearest,
    rtn_quantize,
    summary,
)
from ._byte_allocation import BytePlan, Format, check_budget, embedding_head, format_options, plan_formats
from ._factors import whitened_factors

__all__ = ["GPTQConfig", "gptq_quantize", "low_rank_correction"]


def check_model(config: GPTQConfig, model: nn.Module, dtype: torch.dtype) -> None:
    """Before any work (the pipeline calls it once the model is loaded): the byte budget is
    reachable by the formats on offer, written in `dtype`."""
    if config.target_bytes:
        selected = select_linears(model, config.targets, config.ignore)
        check_budget(model, _format_options(model, selected, config), config.target_bytes, dtype, "gptq")


# -- pure tensor functions ---------------------------------------------------------------------


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, grid: Grid, *, act_order: bool = False,
                  block_size: int = 128, dampening: float = 0.01,
                  mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Quantize W (out, in) against H (in, in) ∝ XᵀX -> (codes uint8 (out, in), scales (out, in/g)
    in grid.dtype, zeros uint8 or None, Ŵ = the dequantized codes (out, in) in fp32 or wider).

    `mask` (bool keep-mask (out, in), e.g. an N:M pattern) stays fixed: only kept entries are
    quantized (group parameters from them alone), the others are zero in Ŵ and their share of the
    error feedback is compensated like any rounding error."""
    precision = torch.promote_types(weight.dtype, torch.float32)
    columns = weight.shape[1]
    perm = torch.argsort(torch.diag(hessian), descending=True) if act_order else None
    h = hessian if perm is None else hessian[perm][:, perm]
    upper, dead = inverse_hessian_factor(h, dampening)
    original = weight.detach().to(precision).clone()
    original[:, dead if perm is None else perm[dead]] = 0.0  # never-active inputs never reach the output
    if mask is not None:
        original = original * mask
    work = original.clone() if perm is None else original[:, perm].clone()
    static = perm is not None or grid.group_size > block_size  # per-channel wider than a block: up front
    rule = _GridRule(grid, original, perm, static, mask)
    block = max(block_size // grid.group_size, 1) * grid.group_size if not static else block_size
    obs_sweep(work, upper.to(precision), min(block, columns), rule)
    if perm is not None:
        work = work[:, torch.argsort(perm)]
    zeros = None if rule.zeros is None else rule.zeros.to(torch.uint8)
    return rule.codes, rule.scales.to(grid.dtype), zeros, work


class _GridRule:
    """GPTQ's column operation: round to the group's grid; a group's parameters are fixed when its
    first column is reached (or up front from the original weight, `static`)."""

    def __init__(self, grid: Grid, original: Tensor, perm: Tensor | None, static: bool, mask: Tensor | None) -> None:
        out_f, in_f = original.shape
        self.grid, self.perm, self.mask = grid, None if perm is None else perm.tolist(), mask
        self.codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=original.device)
        groups = original.reshape(out_f, in_f // grid.group_size, grid.group_size)
        scales, zeros = grid.scales_and_zeros(groups, least_error=False)  # static; else overwritten per group
        self.static, self.scales, self.zeros = static, scales, zeros

    def begin_block(self, block: Tensor, scale: Tensor, start: int, stop: int) -> None:
        pass

    def column(self, block: Tensor, scale: Tensor, col: int, start: int) -> Tensor:
        index = start + col if self.perm is None else self.perm[start + col]
        group = index // self.grid.group_size
        if not self.static and index % self.grid.group_size == 0:
            columns = block[:, col:col + self.grid.group_size]
            if self.mask is not None:  # the parameters of the kept entries only
                columns = columns * self.mask[:, index:index + self.grid.group_size]
            self.scales[:, group], zeros = self.grid.scales_and_zeros(columns, least_error=False)
            if zeros is not None:
                self.zeros[:, group] = zeros
        s = self.scales[:, group]
        z = None if self.zeros is None else self.zeros[:, group]
        codes = quantize_codes(block[:, col], s, z, self.grid.bits)
        self.codes[:, index] = codes.to(torch.uint8)
        new = dequantize_codes(codes, s, z, self.grid.bits)
        return new if self.mask is None else torch.where(self.mask[:, index], new, torch.zeros_like(new))

    def end_block(self, start: int, stop: int) -> None:
        pass


def low_rank_correction(residual: Tensor, hessian: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U (out, r), V (r, in)) fp64: the rank-r SVD of the residual whitened by the Cholesky
    factor of H (SVD-LLM's whitening), un-whitened; minimises ‖(E − UV)X‖ over rank-r UV."""
    chol, _ = cholesky_with_shift(hessian)
    left, right, _ = whitened_factors(residual, chol, rank)
    return left, right


# -- wiring ------------------------------------------------------------------------------------


def _quantize_one(name: str, module: nn.Module, stats: LayerStats | None, config: GPTQConfig,
                  rows: list[dict[str, Any]]) -> nn.Module:
    """One linear: GPTQ against its calibration Hessian (RTN when it has none), plus the
    correction; appends the report row."""
    if isinstance(module, LowRankLinear) and stats is not None:
        return _quantize_low_rank(name, module, stats.second_moment(), config, rows)
    if isinstance(module, NMSparseLinear) and stats is not None:
        return _quantize_nm(name, module, stats.second_moment(), config, rows)
    weight = linear_weight(module).detach()
    grid = layer_grid(config, weight)
    if stats is None or isinstance(module, (LowRankLinear, NMSparseLinear)):  # outside every block (no calibration inputs): round to nearest
        return round_to_nearest(name, module, config, rows, solver="rtn")
    hessian = stats.second_moment()
    codes, scales, zeros, quantized = gptq_quantize(weight, hessian, grid, act_order=config.act_order,
                                                    block_size=config.block_size, dampening=config.dampening)
    correction = None
    if config.correction_rank:
        u, v = low_rank_correction(weight.double() - quantized.double(), stats.hessian(), config.correction_rank)
        correction = (u.to(weight.dtype), v.to(weight.dtype))
    layer = quant_layer(codes, scales, zeros, grid, getattr(module, "bias", None), correction)
    rows.append(quant_row(name, weight, layer, solver="gptq", correction_rank=config.correction_rank,
                          output_error=round(output_error(weight, layer.dense_weight().detach(), hessian), 6),
                          output_error_rtn=round(output_error(weight, _rtn_weight(weight, grid), hessian), 6)))
    return layer


def _quantize_low_rank(name: str, module: LowRankLinear, hessian: Tensor, config: GPTQConfig,
                       rows: list[dict[str, Any]]) -> nn.Module:
    """Both factors of W ≈ U V (§17.4): V against the Hessian of x, then U against the Hessian of
    its actual input V̂ x, E[(V̂x)(V̂x)ᵀ] = V̂ H V̂ᵀ, so U's error feedback sees the quantized V."""
    v_grid, u_grid = factor_grids(config, module)
    solve = {"act_order": config.act_order, "block_size": config.block_size, "dampening": config.dampening}
    *v, v_hat = gptq_quantize(module.v.detach(), hessian, v_grid, **solve)
    inner = v_hat.double() @ hessian.double() @ v_hat.double().T
    *u, _ = gptq_quantize(module.u.detach(), inner, u_grid, **solve)
    layer = quant_low_rank(u, v, u_grid, v_grid, module.bias)
    weight = module.dense_weight().detach()
    rows.append(quant_row(name, weight, layer, solver="gptq", output_error=round(
        output_error(weight, layer.dense_weight().detach(), hessian), 6)))
    return layer


def _quantize_nm(name: str, module: NMSparseLinear, hessian: Tensor, config: GPTQConfig,
                 rows: list[dict[str, Any]]) -> nn.Module:
    """The kept values of an N:M layer (§17.4), its mask fixed: GPTQ over the dense columns with
    groups of whole N:M groups, then the kept entries' codes in slot order."""
    weight = module.dense_weight().detach()
    slot_grid, column_grid = nm_grids(config, module)
    keep = nm_keep_mask(module)
    codes, scales, zeros, _ = gptq_quantize(weight, hessian, column_grid, act_order=config.act_order,
                                            block_size=config.block_size, dampening=config.dampening, mask=keep)
    layer = quant_nm(nm_slots(codes, module), scales, zeros, module, slot_grid)
    rows.append(quant_row(name, weight, layer, solver="gptq", output_error=round(
        output_error(weight, layer.dense_weight().detach(), hessian), 6)))
    return layer


def _rtn_weight(weight: Tensor, grid: Grid) -> Tensor:
    """RTN's dequantized weight on the same grid: the reference GPTQ's error feedback must beat."""
    codes, scales, zeros = rtn_quantize(weight, grid)
    groups = codes.float().reshape(weight.shape[0], -1, grid.group_size)
    zero_cols = None if zeros is None else zeros.float().unsqueeze(-1)
    return dequantize_codes(groups, scales.float().unsqueeze(-1), zero_cols, grid.bits).reshape(weight.shape)


def _check_rank(selected: dict[str, nn.Module], rank: int) -> None:
    factored = [n for n, m in selected.items() if isinstance(m, (LowRankLinear, NMSparseLinear))]
    if rank and factored:
        raise ConfigError(f"gptq: `correction_rank` applies to dense linears, but {factored[0]} is already "
                          "compressed; drop `correction_rank` or add the compressed layers to `ignore`")
    bad = [n for n, m in selected.items() if rank > min(linear_shape(m))]
    if bad:
        raise ConfigError(f"gptq: `correction_rank`={rank} exceeds min(out, in) of {len(bad)} layer(s), e.g. "
                          f"{bad[0]} {linear_shape(selected[bad[0]])}; choose at most the smaller dimension")


@register(GPTQConfig, check_model=check_model)
def apply(model: nn.Module, config: GPTQConfig, ctx: Context) -> StageResult:
    """Quantize every targeted linear with GPTQ, block by block on the calibration engine (each at
    the format the byte allocation chose, with `target_bytes`); the input embedding and a tied
    lm_head, when `embedding_bits` (or `embedding_bit_options`) asks, round to nearest first (or, with
    `embedding_gptq`, by GPTQ after the blocks)."""
    selected = select_linears(model, config.targets, config.ignore)
    check_targets("gptq", selected, 0 if config.target_bytes else config.group_size)
    _check_rank(selected, config.correction_rank)
    embedding = check_embedding("gptq", model, _embedding_config(config))
    notes: list[str] = []
    plan = _byte_plan(model, selected, config, ctx, notes) if config.target_bytes else None
    table_config = config  # the embedding's grid: as configured, or the format the plan chose
    if plan is not None and embedding is not None:
        fmt = plan.formats[embedding_head(model)[0]]
        table_config = replace(config, embedding_bits=fmt.bits, embedding_group_size=fmt.group_size,
                               target_bytes=0.0, embedding_bit_options=())
    head_gptq = _check_head_gptq(model, embedding, table_config)
    rows: list[dict[str, Any]] = []
    if embedding is not None and not head_gptq:  # first: the blocks calibrate on its outputs
        quantize_embedding(model, embedding, table_config, set(selected), rows)

    def compress(name: str, module: nn.Module, stats: LayerStats | None) -> nn.Module:
        if plan is None:
            return _quantize_one(name, module, stats, config, rows)
        fmt = plan.formats[name]
        own = replace(config, bits=fmt.bits, group_size=fmt.group_size, correction_rank=fmt.rank, target_bytes=0.0,
                      embedding_bit_options=())
        return _quantize_one(name, module, stats, own, rows)

    windows = ctx.windows(config.calibration, split="calib", seq_len=config.seq_len, num_windows=config.num_windows)
    outside = compress_blocks(model, selected, CalibrationHooks("hessian", compress), windows, ctx,
                              batch_size=config.batch_size, description="gptq").outside
    if outside:
        notes.append(f"{len(outside)} linear(s) outside the transformer blocks were rounded to nearest: "
                     f"{', '.join(outside[:4])}")
    if head_gptq:
        _quantize_tied_table(model, embedding, table_config, windows, rows)
    metrics = summary(rows)
    if plan is not None:
        metrics.update(target_bytes=config.target_bytes, budget_bytes=plan.budget, predicted_bytes=plan.predicted,
                       dense_bf16_bytes=plan.dense, predicted_loss=round(sum(plan.losses.values()), 8))
        for row in rows:
            fmt = plan.formats.get(row["module"])  # an untied head follows its embedding's format
            row.update(format=None if fmt is None else fmt.label, predicted_loss=plan.losses.get(row["module"]))
    return StageResult(metrics=metrics, per_module=rows, notes=notes)


def _format_options(model: nn.Module, selected: dict[str, nn.Module], config: GPTQConfig) -> dict[str, list[Format]]:
    """{unit: the formats `target_bytes` may give it}: each selected linear, and the input
    embedding (with its head) when `embedding_bit_options` or `embedding_bits` quantizes it;
    ConfigError for a unit no group size fits."""
    groups = config.group_options or (config.group_size,)
    options = {n: format_options(linear_shape(m), config.bit_options, groups, config.correction_ranks)
               for n, m in selected.items()}
    embedding_bits = config.embedding_bit_options or ((config.embedding_bits,) if config.embedding_bits else ())
    name = embedding_head(model)[0]
    if embedding_bits and name is not None:
        table = dict(model.named_modules())[name]
        own = groups if config.embedding_group_size is None else (config.embedding_group_size,)
        options[name] = format_options((table.num_embeddings, table.embedding_dim), embedding_bits, own, (0,))
    unfit = [n for n, o in options.items() if not o]
    if unfit:
        raise ConfigError(f"gptq: no group size of {list(groups)} divides the columns of {len(unfit)} matrix(es): "
                          f"{', '.join(unfit[:3])}; add 0 (per-channel) to `group_options`")
    return options


def _embedding_config(config: GPTQConfig) -> GPTQConfig:
    """The config check_embedding validates: with `embedding_bit_options`, one of those widths."""
    if not config.embedding_bit_options:
        return config
    return replace(config, embedding_bits=max(config.embedding_bit_options), target_bytes=0.0, embedding_bit_options=())


def _byte_plan(model: nn.Module, selected: dict[str, nn.Module], config: GPTQConfig, ctx: Context,
               notes: list[str]) -> BytePlan:
    """Each matrix's format under `target_bytes` (see `_byte_allocation`), and its report line."""
    compressed = [n for n, m in selected.items() if isinstance(m, CompressedLinear)]
    if compressed:
        raise ConfigError(f"gptq: `target_bytes` chooses formats for dense linears, but {compressed[0]} is already "
                          "compressed; add the compressed layers to `ignore` or use `bits` without `target_bytes`")
    options = _format_options(model, selected, config)
    dtype = ctx.checkpoint_dtype or torch.bfloat16
    plan = plan_formats(model, selected, options, config.target_bytes, dtype, config, ctx, notes)
    counts: dict[str, int] = {}
    for fmt in plan.formats.values():
        counts[fmt.label] = counts.get(fmt.label, 0) + 1
    notes.append(f"target_bytes {config.target_bytes:g}: budget {plan.budget} bytes of the dense bf16 {plan.dense}; "
                 f"predicted model.safetensors {plan.predicted} bytes ({plan.predicted / plan.dense:.4f}); formats "
                 + ", ".join(f"{label} ×{n}" for label, n in sorted(counts.items())))
    return plan


def _check_head_gptq(model: nn.Module, embedding: nn.Embedding | None, config: GPTQConfig) -> bool:
    if not config.embedding_gptq:
        return False
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if embedding is None or getattr(head, "weight", None) is not embedding.weight:
        raise ConfigError("gptq: `embedding_gptq` quantizes a tied embedding / lm_head table, so it needs "
                          "`embedding_bits` and a model whose lm_head shares the embedding's weight; drop it")
    return True


@torch.no_grad()
def head_hessian(model: nn.Module, windows: Tensor, batch_size: int) -> Tensor:
    """E[x xᵀ] (fp64) of lm_head's input (the final-norm hidden states) over the windows."""
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    total = torch.zeros(head.in_features, head.in_features, dtype=torch.float64, device=device)
    count = 0

    def accumulate(_module: nn.Module, args: tuple) -> None:
        nonlocal count
        x = args[0].reshape(-1, head.in_features).double()
        total.add_(x.T @ x)
        count += x.shape[0]

    handle = head.register_forward_pre_hook(accumulate)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(device)
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
    finally:
        handle.remove()
    return total / max(count, 1)


def _quantize_tied_table(model: nn.Module, embedding: nn.Embedding, config: GPTQConfig, windows: Tensor,
                         rows: list[dict[str, Any]]) -> None:
    """The tied table by GPTQ against lm_head's input Hessian; the lookup reads the same codes."""
    hessian = head_hessian(model, windows, config.batch_size)
    weight = embedding.weight.detach()
    grid = embedding_grid(config, weight)
    codes, scales, zeros, _ = gptq_quantize(weight, hessian.to(weight.device), grid, act_order=config.act_order,
                                            block_size=config.block_size, dampening=config.dampening)
    quantize_embedding(model, embedding, config, set(), rows, codes=(codes, scales, zeros))
    table = model.get_input_embeddings().dense_weight().detach()
    rows[-1].update(solver="gptq", output_error=round(output_error(weight, table, hessian), 6),
                    output_error_rtn=round(output_error(weight, _rtn_weight(weight, grid), hessian), 6))

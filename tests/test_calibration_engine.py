"""The calibration engine: statistics kinds, shared accumulators, the two phases inside a block,
sequential propagation of the compressed outputs, the teacher stream, linears outside the blocks
and in-place steps on offloaded layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressor.calibration import (
    CalibrationHooks,
    LayerStats,
    block_linears,
    calibrated_phases,
    capture_block_inputs,
    capture_linear_inputs,
    collect_stats,
    compress_blocks,
    compress_layer,
    transformer_blocks,
)
from compressor.context import Context
from compressor.offload import has_offloaded_weights, offload_to_cpu
from compressor.targeting import find_linears, select_linears
from compressor.testing.tiny import tiny_llama

BATCH = 2


def _windows(model) -> torch.Tensor:
    return Context.for_model(model).windows("default", split="calib", seq_len=16, num_windows=4)


def _scaled(module: nn.Module, factor: float) -> nn.Linear:
    """A plain copy of `module` with its weight scaled: a stand-in compression."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight.mul_(factor)
    return new


def _recorder(seen: dict, change=None):
    """A compress step that records each layer's statistics and returns change(name, module)."""

    def step(name, module, stats):
        seen[name] = stats
        return None if change is None else change(name, module)

    return step


def _inputs_of(model: nn.Module, linear_name: str, windows: torch.Tensor) -> torch.Tensor:
    """Every (tokens, in) input the linear sees over full-model forwards on `windows`, batched like
    the engine."""
    seen = []
    with torch.no_grad(), capture_linear_inputs({linear_name: model.get_submodule(linear_name)},
                                                lambda _n, x: seen.append(x)):
        for start in range(0, windows.shape[0], BATCH):
            batch = windows[start:start + BATCH]
            model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    return torch.cat(seen)


def _assert_close_to_fp64(accumulated: torch.Tensor, exact: torch.Tensor) -> None:
    """fp32 batch products against the fp64 product: equal to fp32 rounding of the largest entry."""
    torch.testing.assert_close(accumulated, exact, rtol=0, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("kind", ["abs_mean", "sq_norm", "hessian", "hessian+cross"])
def test_statistics_accumulate_batches_like_one_product(kind):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=generator)
    x_teacher = x + 0.1 * torch.randn(300, 12, generator=generator)
    stats = LayerStats(kind)
    for start in range(0, 300, 70):
        stats.add(x[start:start + 70], x_teacher[start:start + 70])
    assert stats.tokens == 300
    x64, t64 = x.double(), x_teacher.double()
    if kind == "abs_mean":
        torch.testing.assert_close(stats.abs_mean(), x64.abs().mean(0))
    elif kind == "sq_norm":
        torch.testing.assert_close(stats.mean_square(), x64.square().mean(0))
    else:
        torch.testing.assert_close(stats.second_moment(), x64.T @ x64 / 300)
        assert torch.equal(stats.hessian(), stats.hessian().T)  # symmetrised exactly
        torch.testing.assert_close(stats.hessian(), stats.second_moment(), rtol=1e-12, atol=1e-12)
    if kind == "hessian+cross":
        torch.testing.assert_close(stats.teacher_cross(), t64.T @ x64 / 300)


def test_second_moment_is_the_fp64_sum_of_fp32_batch_products_unsymmetrised():
    """prune, dsformer and maestro read X Xᵀ/N exactly as summed; svd-llm's hessian() symmetrises."""
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    stats = LayerStats("hessian")
    stats.add(x[:32])
    stats.add(x[32:])
    expected = ((x[:32].T @ x[:32]).double() + (x[32:].T @ x[32:]).double()) / 64
    assert torch.equal(stats.second_moment(), expected)
    assert torch.equal(stats.hessian(), (expected + expected.T) / 2)


def test_unknown_statistics_kind_is_refused():
    with pytest.raises(ValueError, match="sq_norm"):
        LayerStats("gram")


def test_linears_reading_the_same_tensor_share_one_accumulator():
    model = tiny_llama()
    name, block = transformer_blocks(model)[0]
    inputs = capture_block_inputs(model, _windows(model), BATCH)
    linears = block_linears(block, name, {f"{name}.{n}": m for n, m in find_linears(block).items()})
    first = {n: m for n, m in linears.items() if not n.endswith(("o_proj", "down_proj"))}
    with torch.no_grad():
        stats = collect_stats(block, name, first, inputs, "hessian")
    attn, mlp = f"{name}.self_attn", f"{name}.mlp"
    assert stats[f"{attn}.q_proj"] is stats[f"{attn}.k_proj"] is stats[f"{attn}.v_proj"]
    assert stats[f"{mlp}.gate_proj"] is stats[f"{mlp}.up_proj"]
    assert stats[f"{attn}.q_proj"] is not stats[f"{mlp}.gate_proj"]
    assert stats[f"{attn}.q_proj"].tokens == 4 * 16


def test_the_second_phase_is_calibrated_on_the_compressed_first_phase():
    model = tiny_llama()
    seen: dict = {}

    def zero_values(name, module):  # v_proj -> 0 makes the attention output, o_proj's input, 0
        return _scaled(module, 0.0) if name.endswith("v_proj") else None

    compress_blocks(model, select_linears(model, (), ()), CalibrationHooks("hessian", _recorder(seen, zero_values)),
                    _windows(model), Context.for_model(model), batch_size=BATCH)
    for block in ("model.layers.0", "model.layers.1"):
        assert seen[f"{block}.self_attn.o_proj"].second_moment().abs().max() == 0
        assert seen[f"{block}.mlp.down_proj"].second_moment().abs().max() > 0


def test_each_block_is_calibrated_on_the_compressed_outputs_of_the_blocks_before():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    windows = _windows(model)
    seen: dict = {}

    def halve_block_0(name, module):
        return _scaled(module, 0.5) if name.startswith("model.layers.0.") else None

    summary = compress_blocks(model, select_linears(model, (), ()),
                              CalibrationHooks("hessian", _recorder(seen, halve_block_0)), windows,
                              Context.for_model(model), batch_size=BATCH)
    target = "model.layers.1.self_attn.q_proj"
    x = _inputs_of(model, target, windows).double()  # block 0 compressed, block 1 untouched
    _assert_close_to_fp64(seen[target].second_moment(), x.T @ x / x.shape[0])
    x_dense = _inputs_of(dense, target, windows).double()
    assert not torch.allclose(x, x_dense)  # so the check above could fail
    assert summary.metrics["calibration_tokens"] == 4 * 16 and summary.outside == []


def test_the_teacher_stream_pairs_the_dense_models_inputs_with_the_compressed_ones():
    model = tiny_llama()
    dense = copy.deepcopy(model)
    windows = _windows(model)
    seen: dict = {}
    compress_blocks(model, select_linears(model, (), ()),
                    CalibrationHooks("hessian+cross", _recorder(seen, lambda _n, m: _scaled(m, 0.5))),
                    windows, Context.for_model(model), batch_size=BATCH)
    # nothing is compressed upstream of block 0's first phase: both streams read the same tensor
    first = seen["model.layers.0.self_attn.q_proj"]
    assert torch.equal(first.teacher_cross(), first.second_moment())
    target = "model.layers.1.self_attn.q_proj"
    x = _inputs_of(model, target, windows).double()
    x_teacher = _inputs_of(dense, target, windows).double()
    _assert_close_to_fp64(seen[target].teacher_cross(), x_teacher.T @ x / x.shape[0])
    assert not torch.allclose(seen[target].teacher_cross(), seen[target].second_moment())


def test_linears_outside_the_blocks_get_no_statistics():
    model = tiny_llama()
    seen: dict = {}
    linears = select_linears(model, ("lm_head", "q_proj"), ())
    summary = compress_blocks(model, linears, CalibrationHooks("sq_norm", _recorder(seen)), _windows(model),
                              Context.for_model(model), batch_size=BATCH)
    assert summary.outside == ["lm_head"] and seen["lm_head"] is None
    assert isinstance(seen["model.layers.1.self_attn.q_proj"], LayerStats)
    assert list(seen) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]


def test_an_in_place_step_on_an_offloaded_linear_installs_its_written_copy():
    """An offloaded layer's weights are reloaded from the store on every forward, so a write into
    them would be lost: the step gets a hook-free copy, which replaces the layer."""
    layer = nn.Linear(5, 4)
    expected = layer.weight.detach().clone()
    expected[:, ::2] = 0
    holder = nn.Sequential(offload_to_cpu(layer, "cpu"))

    def zero_even_columns(_name, module, _stats):
        with torch.no_grad():
            module.weight[:, ::2] = 0

    compress_layer(holder, "0", layer, None, CalibrationHooks(None, zero_even_columns, in_place=True))
    installed = holder[0]
    assert installed is not layer and not has_offloaded_weights(installed)
    assert torch.equal(installed.weight, expected)


def test_a_read_only_step_leaves_an_offloaded_linear_in_place():
    layer = nn.Linear(5, 4)
    weight = layer.weight.detach().clone()
    holder = nn.Sequential(offload_to_cpu(layer, "cpu"))
    read = []
    compress_layer(holder, "0", layer, None, CalibrationHooks(None, lambda _n, m, _s: read.append(m.weight.clone())))
    assert holder[0] is layer and has_offloaded_weights(layer)
    assert torch.equal(read[0], weight)  # the step saw the real weight, not the meta placeholder


def test_calibrated_phases_calls_the_step_per_phase_and_returns_its_summary():
    """Results are returned (no summary argument filled once a generator is exhausted): one step
    per phase of each block, in order, and the linears in no block listed in the summary."""
    model = tiny_llama()
    linears = select_linears(model, ("q_proj", "o_proj", "lm_head"), ())
    phases: list[list[str]] = []
    summary = calibrated_phases(model, linears, "sq_norm", _windows(model), Context.for_model(model),
                                lambda phase, stats: phases.append(sorted(stats)), batch_size=BATCH)
    blocks = len(transformer_blocks(model))
    assert phases == [[f"model.layers.{b}.self_attn.{p}"] for b in range(blocks) for p in ("q_proj", "o_proj")]
    assert summary.outside == ["lm_head"]
    assert summary.metrics["calibration_windows"] == 4 and summary.metrics["calibration_tokens"] == 4 * 16

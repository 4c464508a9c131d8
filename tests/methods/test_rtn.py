"""rtn: the grid by hand (symmetric and asymmetric), 8-bit accuracy, packed storage and the
stage's refusals (bits 5, a group size that does not divide in_features, quantizing twice)."""

from __future__ import annotations

import pytest
import torch
from compressor.cli.main import app
from typer.testing import CliRunner

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.layers import QuantLinear
from compressor.methods._quant_grid import Grid, rtn_quantize
from compressor.methods.rtn import RTNConfig
from compressor.methods.rtn import apply as rtn_apply
from compressor.testing import tiny_llama

runner = CliRunner()


def dequantized(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    codes, scales, zeros = rtn_quantize(weight, grid)
    groups = codes.float().reshape(weight.shape[0], -1, grid.group_size)
    offset = 2 ** (grid.bits - 1) if zeros is None else zeros.float().unsqueeze(-1)
    return ((groups - offset) * scales.unsqueeze(-1)).reshape(weight.shape)


def test_symmetric_rtn_is_the_hand_computed_grid():
    # 2 bits, groups of 2: s = max|w| / 1.5; c = clamp(round(w/s) + 2, 0, 3); ŵ = s (c - 2)
    weight = torch.tensor([[0.3, -0.6, 1.2, 0.0]])
    codes, scales, zeros = rtn_quantize(weight, Grid(2, 2, True, torch.float32))
    assert zeros is None
    torch.testing.assert_close(scales, torch.tensor([[0.4, 0.8]]))
    assert codes.tolist() == [[3, 0, 3, 2]]  # 0.75 -> 1, -1.5 -> -2 (half to even), 1.5 -> 2 clamped to 1
    torch.testing.assert_close(dequantized(weight, Grid(2, 2, True, torch.float32)),
                               torch.tensor([[0.4, -0.8, 0.8, 0.0]]))


def test_asymmetric_rtn_puts_zero_on_the_grid_with_an_integer_zero_point():
    # lo = -1, hi = 2: s = 3 / 3 = 1, z = round(1 / 1) = 1, c = round(w / s + z)
    weight = torch.tensor([[-1.0, 0.5, 2.0, 1.0]])
    codes, scales, zeros = rtn_quantize(weight, Grid(2, 4, False, torch.float32))
    assert scales.tolist() == [[1.0]] and zeros.tolist() == [[1]]
    assert codes.tolist() == [[0, 2, 3, 2]]  # 1.5 rounds half to even: 2
    assert dequantized(weight, Grid(2, 4, False, torch.float32)).tolist() == [[-1.0, 1.0, 2.0, 1.0]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_eight_bits_is_within_one_percent_relative_weight_error(symmetric):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    grid = Grid(8, 64, symmetric, torch.float32)
    error = (dequantized(weight, grid) - weight).norm() / weight.norm()
    assert error < 0.01


def test_scales_are_chosen_as_the_checkpoint_stores_them():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    _, scales, _ = rtn_quantize(weight, Grid(4, 16, True, torch.bfloat16))
    assert scales.dtype == torch.bfloat16


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_bfloat16_scale_is_the_storable_neighbour_with_the_least_group_error(symmetric):
    """Rounding the ideal scale to the nearest bf16 moves a group's grid by up to 0.4 %; of the
    nearest and its two bf16 neighbours, the stored one has the least squared error (codes chosen
    against it as stored): never worse than the nearest, better for many groups."""
    weight = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    groups = weight.reshape(256, 1, 64)
    _, scales, _ = rtn_quantize(weight, Grid(4, 64, symmetric, torch.bfloat16))
    stored = dequantized(weight, Grid(4, 64, symmetric, torch.bfloat16)).reshape(groups.shape)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    ideal = torch.maximum(-lo, hi) / 7.5 if symmetric else (hi - lo) / 15
    nearest = ideal.to(torch.bfloat16).float().unsqueeze(-1)
    up, down = (torch.nextafter(ideal.to(torch.bfloat16), torch.tensor(x, dtype=torch.bfloat16)) for x in (9.0, 0.0))
    assert torch.all((scales == ideal.to(torch.bfloat16)) | (scales == up) | (scales == down))
    zero = 8 if symmetric else (-lo.unsqueeze(-1) / nearest).round().clamp(0, 15)
    rounded = nearest * ((groups / nearest + zero).round().clamp(0, 15) - zero)
    error, error_nearest = ((stored - groups) ** 2).sum(-1), ((rounded - groups) ** 2).sum(-1)
    assert torch.all(error <= error_nearest) and (error < error_nearest).float().mean() > 0.2


def test_apply_packs_every_linear_into_b_bit_codes():
    model = tiny_llama()
    result = rtn_apply(model, RTNConfig(bits=3, group_size=16), Context.for_model(model))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == result.metrics["layers"] == 14
    for layer in layers:  # 3 bits per weight, rounded up per row; one scale per 16 inputs
        assert layer.qweight.shape == (layer.out_features, -(-layer.in_features * 3 // 8))
        assert layer.scales.shape == (layer.out_features, layer.in_features // 16)
    row = result.per_module[0]
    assert row["stored_bytes"] == 32 * 12 + 32 * 2 * 4  # q_proj 32x32: packed codes + fp32 scales


def test_config_refuses_bits_outside_the_grids():
    with pytest.raises(ConfigError, match=r"rtn: `bits` must be one of 2, 3, 4, 8, got 5"):
        RTNConfig(bits=5)
    with pytest.raises(ConfigError, match="`group_size` must be a positive integer"):
        RTNConfig(group_size=-2)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    for flags, fragment in ((["--bits", "5"], "`bits` must be one of 2, 3, 4, 8, got 5"),
                            (["--group-size", "48"], "`group_size`=48 does not divide in_features")):
        out = tmp_path / "out"
        result = runner.invoke(app, ["compress", "--method", "rtn", *flags, "--out", str(out), "-q"])
        assert result.exit_code != 0
        text = result.output.strip()
        assert text.startswith("error:") and fragment in text and "Traceback" not in text, text
        assert not out.exists()


def test_quantizing_an_already_quantized_layer_is_refused_before_anything_changes(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("stages:\n  - {method: rtn, group_size: 0}\n  - {method: rtn, group_size: 0}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out), "-q"])
    assert result.exit_code != 0
    assert "is already quantized (4 bits)" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_low_rank_layer_gets_both_factors_rounded():
    from compressor.layers import LowRankLinear, QuantLowRankLinear
    from compressor.targeting import replace_module

    model = tiny_llama()
    gen = torch.Generator().manual_seed(4)
    u, v = torch.randn(32, 8, generator=gen), torch.randn(8, 32, generator=gen)
    replace_module(model, "model.layers.0.self_attn.q_proj", LowRankLinear.from_factors(u, v))
    rtn_apply(model, RTNConfig(bits=4, group_size=16), Context.for_model(model))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLowRankLinear) and layer.u_group_size == 8  # 16 does not divide rank 8
    want = dequantized(u, Grid(4, 8, True, torch.float32)) @ dequantized(v, Grid(4, 16, True, torch.float32))
    assert torch.equal(layer.dense_weight(), want)

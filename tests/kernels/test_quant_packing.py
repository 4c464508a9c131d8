"""Packed integer codes of weight-only quantization: layout, exact round trip, dequantization and
the quantized linear reference."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels.dispatch import dequantize_int, pack_int, quant_linear, unpack_int
from compressor.layers import QuantLinear


def random_codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 5, 7, 8, 13, 64, 171])
def test_pack_unpack_is_exact_and_takes_ceil_cols_bits_over_8_bytes(bits, cols):
    codes = random_codes(6, cols, bits, seed=cols)
    packed = pack_int(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, -(-cols * bits // 8))
    assert torch.equal(unpack_int(packed, bits, cols), codes)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    assert pack_int(codes, 4).tolist() == [[1 | 2 << 4, 15, 7]]


def test_int2_packs_four_codes_per_byte_lowest_bits_first():
    codes = torch.tensor([[3, 0, 1, 2, 1]], dtype=torch.uint8)
    assert pack_int(codes, 2).tolist() == [[3 | 1 << 4 | 2 << 6, 1]]


def test_int3_codes_run_across_byte_boundaries_little_endian():
    # codes 5, 3, 6 -> bits 101 | 011 | 110 at positions 0-2, 3-5, 6-8 of the row's bit stream
    codes = torch.tensor([[5, 3, 6]], dtype=torch.uint8)
    stream = 5 | 3 << 3 | 6 << 6
    assert pack_int(codes, 3).tolist() == [[stream & 0xFF, stream >> 8]]
    eight = random_codes(3, 8, 3)
    assert pack_int(eight, 3).shape == (3, 3)


def test_symmetric_dequantization_is_scale_times_code_minus_half_range():
    codes = torch.tensor([[0, 8, 15, 9]], dtype=torch.uint8)  # int4: q = c - 8
    scales = torch.tensor([[0.5, 2.0]])
    weight = dequantize_int(pack_int(codes, 4), scales, None, 4, 2, 4)
    assert weight.tolist() == [[-4.0, 0.0, 14.0, 2.0]]


def test_asymmetric_dequantization_uses_the_group_zero_point():
    codes = torch.tensor([[0, 3, 1, 2]], dtype=torch.uint8)  # int2, groups of 2
    scales = torch.tensor([[0.25, 1.0]])
    zeros = torch.tensor([[1, 3]], dtype=torch.uint8)
    weight = dequantize_int(pack_int(codes, 2), scales, zeros, 2, 2, 4)
    assert weight.tolist() == [[-0.25, 0.5, -2.0, -1.0]]


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False), (8, True)])
def test_quant_linear_is_the_linear_map_of_the_dequantized_weight(bits, symmetric):
    gen = torch.Generator().manual_seed(1)
    codes = random_codes(5, 24, bits)
    scales = torch.rand(5, 3, generator=gen) + 0.1
    zeros = None if symmetric else random_codes(5, 3, bits, seed=2)
    x, bias = torch.randn(2, 3, 24, generator=gen), torch.randn(5, generator=gen)
    packed = pack_int(codes, bits)
    expected = x @ dequantize_int(packed, scales, zeros, bits, 8, 24).T + bias
    assert torch.equal(quant_linear(x, packed, scales, zeros, bias, bits, 8, 24), expected)


def test_bad_operands_name_the_problem():
    packed = pack_int(random_codes(2, 8, 4), 4)
    with pytest.raises(ValueError, match="`bits` must be one of"):
        pack_int(random_codes(2, 8, 4), 5)
    with pytest.raises(ValueError, match="must divide in_features=8"):
        dequantize_int(packed, torch.ones(2, 2), None, 4, 3, 8)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_int(packed, 4, 12)
    with pytest.raises(ValueError, match="`scales` is torch.float64 but `x` is torch.float32"):
        quant_linear(torch.ones(1, 8), packed, torch.ones(2, 1, dtype=torch.float64), None, None, 4, 8, 8)


def test_quant_layer_forward_adds_its_low_rank_correction():
    gen = torch.Generator().manual_seed(3)
    packed, scales = pack_int(random_codes(4, 16, 4), 4), torch.rand(4, 2, generator=gen)
    cu, cv = torch.randn(4, 2, generator=gen), torch.randn(2, 16, generator=gen)
    layer = QuantLinear.from_codes(packed, scales, None, 4, 8, 16, correction=(cu, cv))
    x = torch.randn(3, 16, generator=gen)
    expected = x @ (dequantize_int(packed, scales, None, 4, 8, 16) + cu @ cv).T
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.dense_weight(), dequantize_int(packed, scales, None, 4, 8, 16) + cu @ cv)
    assert layer.init_args() == {"in_features": 16, "out_features": 4, "bits": 4, "group_size": 8,
                                 "symmetric": True, "bias": False, "correction_rank": 2}

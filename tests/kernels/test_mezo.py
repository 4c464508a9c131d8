"""MeZO noise: the counter-based stream, its statistics, and the in-place perturbation."""

from __future__ import annotations

import pytest
import torch
from compressor.kernels.dispatch import mezo_axpy_, mezo_normal
from compressor.kernels import ref

SEEDS = [0, 123456789, 2**40 + 7]


def test_same_seed_and_offset_give_the_same_noise():
    assert torch.equal(mezo_normal(5000, 42, 17), mezo_normal(5000, 42, 17))


def test_offset_indexes_one_stream_and_other_draws_differ():
    whole = mezo_normal(4096, 9, 0)
    torch.testing.assert_close(mezo_normal(1000, 9, 1003), whole[1003:2003], rtol=0, atol=0)
    assert not torch.equal(mezo_normal(1000, 9, 0), mezo_normal(1000, 9, 1000))
    assert not torch.equal(mezo_normal(1000, 9, 0), mezo_normal(1000, 10, 0))


def test_chunk_boundaries_do_not_change_the_stream():
    """The reference works in chunks of 2**18 values; reading across a boundary changes nothing."""
    whole = mezo_normal(2**18 + 100, 3, 5)
    torch.testing.assert_close(
        mezo_normal(200, 3, 5 + 2**18 - 100), whole[2**18 - 100 :], rtol=0, atol=0
    )


def test_noise_is_standard_normal():
    z = mezo_normal(100_000, 2024, 0).double()
    assert abs(z.mean().item()) < 0.02  # standard error 0.003
    assert abs(z.std().item() - 1.0) < 0.02
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01
    assert abs((z**3).mean().item()) < 0.05  # symmetric


def test_axpy_adds_scaled_noise_in_place():
    param = torch.randn(3, 333)
    expected = param + 0.25 * mezo_normal(param.numel(), 5, 11).view(3, 333)
    mezo_axpy_(param, 5, 11, 0.25)
    torch.testing.assert_close(param, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plus_minus_two_plus_restores_the_weights(dtype):
    original = torch.randn(10_000, generator=torch.Generator().manual_seed(0)).to(dtype)
    param, eps = original.clone(), 1e-3
    for scale in (eps, -2 * eps, eps):
        mezo_axpy_(param, 77, 0, scale)
    z = mezo_normal(param.numel(), 77, 0).double()
    # each of the 3 steps rounds once: at most 1.5 units of roundoff of the largest value seen
    bound = 1.5 * torch.finfo(dtype).eps * (original.double().abs() + 2 * eps * z.abs())
    assert torch.all((param.double() - original.double()).abs() <= bound)


def test_axpy_applies_to_leaf_parameters_that_require_grad():
    weight = torch.nn.Parameter(torch.zeros(64))
    mezo_axpy_(weight, 1, 0, 1.0)
    torch.testing.assert_close(weight.detach(), mezo_normal(64, 1, 0), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("numel,offset", [(1001, 3), (4097, 2**33 + 2)])
def test_triton_kernel_draws_the_reference_noise(dtype, seed, numel, offset):
    pytest.importorskip("triton")
    from compressor.kernels import triton as tri

    base = torch.randn(numel, generator=torch.Generator().manual_seed(seed % 1000)).to(dtype)
    by_ref, by_triton = base.clone(), base.clone()
    ref.mezo_axpy_(by_ref, seed, offset, 0.5)
    tri.mezo_axpy_(by_triton, seed, offset, 0.5)
    if dtype == torch.float32:
        # The same maths; libm's log/cos may differ by an ulp between numpy, torch and the GPU.
        torch.testing.assert_close(by_triton, by_ref, rtol=0, atol=1e-6)
    else:
        # One rounding of (nearly) the same fp32 value: equal, or one ulp apart.
        torch.testing.assert_close(by_triton, by_ref, rtol=torch.finfo(dtype).eps, atol=0)

"""The fast weight-only quantized linears against the reference (`ref.quant_linear`): the compiled
CPU GEMV the dispatcher takes for one-row CPU inference, and the Triton kernel (run here under
TRITON_INTERPRET=1). Each must give the reference's y to float tolerance, take the reference
wherever it is out of scope, and fall back cleanly when compiling fails."""

from __future__ import annotations

import inspect

import pytest
import torch

import compressor.kernels.dispatch as kernels
from compressor.kernels import _cpu_quant, ref
from compressor.kernels.packing import pack_int

F64 = torch.float64


def quantized(bits, out_f, in_f, group, asymmetric, dtype=torch.float32, seed=0, bias=True):
    """(qweight, scales, zeros, bias) of random codes; scales of order in_f**-0.5 / 2^(b-1)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(out_f, in_f // group, generator=gen) + 0.5) * in_f**-0.5 / 2 ** (bits - 1)
    zeros = (torch.randint(0, 2**bits, scales.shape, generator=gen).to(torch.uint8) if asymmetric else None)
    b = torch.randn(out_f, generator=gen) if bias else None
    return pack_int(codes, bits), scales.to(dtype), zeros, None if b is None else b.to(dtype)


def exact(x, qweight, scales, zeros, bias, bits, group, in_f):
    """fp64 maths on the same (already rounded) operands."""
    weight = ref.dequantize_int(qweight, scales.to(F64), zeros, bits, group, in_f)
    return x.to(F64) @ weight.T + (0 if bias is None else bias.to(F64))


def relative_error(y, target):
    return float((y.to(F64) - target.to(F64)).abs().max() / target.to(F64).abs().max())


@pytest.fixture
def fresh_cpu_quant(monkeypatch):
    """An empty compiled-kernel table and no recorded failure, restored afterwards."""
    monkeypatch.setattr(_cpu_quant, "_kernels", {})
    monkeypatch.setattr(_cpu_quant, "_broken", None)
    monkeypatch.delenv("COMPRESSOR_KERNELS", raising=False)


# -- the fused GEMV's arithmetic (eager: the function inductor compiles) ----------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 64])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gemv_is_the_reference_to_float_tolerance(bits, group, asymmetric, dtype):
    in_f = 64
    qweight, scales, zeros, bias = quantized(bits, 40, in_f, group, asymmetric, dtype, seed=bits * 7 + group)
    x = torch.randn(1, in_f).to(dtype)
    slots = _cpu_quant.byte_slots(x, bits, group, in_f // group)
    y = _cpu_quant.fused_gemv(slots, qweight, scales, zeros, bias, bits, group)
    target = exact(x, qweight, scales, zeros, bias, bits, group, in_f)
    assert y.dtype == dtype and y.shape == (1, 40)
    assert relative_error(y, target) < (1e-6 if dtype == torch.float32 else 8e-3)
    reference = ref.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_f)
    assert relative_error(y, reference) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("bits,in_f", [(4, 251), (2, 87), (4, 86)])
def test_fused_gemv_takes_one_group_of_a_width_that_fills_no_whole_byte(bits, in_f):
    qweight, scales, zeros, bias = quantized(bits, 24, in_f, in_f, False, seed=in_f)
    x = torch.randn(1, in_f)
    y = _cpu_quant.fused_gemv(_cpu_quant.byte_slots(x, bits, in_f, 1), qweight, scales, zeros, bias, bits, in_f)
    assert relative_error(y, exact(x, qweight, scales, zeros, bias, bits, in_f, in_f)) < 1e-6


# -- the dispatcher: compiled on CPU decode rows, the reference elsewhere -------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bits,in_f,group,asymmetric,dtype", [
    (4, 64, 16, False, torch.float32), (8, 64, 64, True, torch.bfloat16), (4, 251, 251, False, torch.float32)])
def test_cpu_decode_row_takes_the_compiled_gemv(fresh_cpu_quant, bits, in_f, group, asymmetric, dtype):
    qweight, scales, zeros, bias = quantized(bits, 48, in_f, group, asymmetric, dtype)
    x = torch.randn(1, 1, in_f).to(dtype)
    with torch.no_grad():
        y = kernels.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_f)
        again = kernels.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_f)
    assert len(_cpu_quant.compiled_keys()) == 1  # compiled once, reused
    assert torch.equal(y, again) and y.shape == (1, 1, 48)
    reference = ref.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_f)
    assert relative_error(y, reference) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_out_of_scope_calls_are_the_reference_exactly(fresh_cpu_quant, monkeypatch):
    qweight, scales, zeros, bias = quantized(4, 24, 64, 16, False)
    args = (qweight, scales, zeros, bias, 4, 16, 64)
    rows = torch.randn(3, 64)  # a prompt / batch: several rows
    assert torch.equal(kernels.quant_linear(rows, *args), ref.quant_linear(rows, *args))
    three = quantized(3, 24, 64, 16, True)  # 3-bit codes straddle bytes
    one = torch.randn(1, 64)
    assert torch.equal(kernels.quant_linear(one, *three, 3, 16, 64), ref.quant_linear(one, *three, 3, 16, 64))
    monkeypatch.setenv("COMPRESSOR_KERNELS", "ref")
    assert torch.equal(kernels.quant_linear(one, *args), ref.quant_linear(one, *args))
    assert _cpu_quant.compiled_keys() == []


def test_training_keeps_the_differentiable_reference(fresh_cpu_quant):
    qweight, scales, zeros, bias = quantized(4, 24, 64, 16, False)
    scales.requires_grad_(True)
    x = torch.randn(1, 64)
    y = kernels.quant_linear(x, qweight, scales, zeros, bias, 4, 16, 64)
    y.sum().backward()
    assert scales.grad is not None and scales.grad.abs().sum() > 0
    assert _cpu_quant.compiled_keys() == []


def test_a_failing_compiler_is_warned_once_and_the_reference_takes_over(fresh_cpu_quant, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_cpu_quant, "_compile", lambda *args: broken)
    qweight, scales, zeros, bias = quantized(4, 24, 64, 16, False)
    x = torch.randn(1, 64)
    with pytest.warns(UserWarning, match="compiled CPU int8/int4 linear failed .*no C\\+\\+ compiler"):
        y = kernels.quant_linear(x, qweight, scales, zeros, bias, 4, 16, 64)
    assert torch.equal(y, ref.quant_linear(x, qweight, scales, zeros, bias, 4, 16, 64))
    assert _cpu_quant._broken.startswith("RuntimeError")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        kernels.quant_linear(x, qweight, scales, zeros, bias, 4, 16, 64)


def test_bad_operands_still_raise_the_references_error(fresh_cpu_quant):
    qweight, scales, zeros, bias = quantized(4, 24, 64, 16, False)
    with pytest.raises(ValueError, match="`scales`"):
        kernels.quant_linear(torch.randn(1, 64), qweight, scales[:, :2], zeros, bias, 4, 16, 64)
    assert _cpu_quant.compiled_keys() == []


@pytest.mark.slow
def test_quantized_tiny_llama_decodes_the_same_tokens_as_the_reference(fresh_cpu_quant, monkeypatch):
    from compressor.layers import QuantLinear
    from compressor.targeting import replace_module, select_linears
    from compressor.testing import tiny_llama

    model = tiny_llama(layers=1)
    for name, linear in select_linears(model, (), ()).items():
        out_f, in_f = linear.weight.shape
        qweight, scales, _, _ = quantized(4, out_f, in_f, 16, False, seed=out_f + in_f, bias=False)
        replace_module(model, name, QuantLinear.from_codes(qweight, scales * 8, None, 4, 16, in_f))
    ids = torch.tensor([[1, 5, 9, 2]])

    def greedy():
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                  min_new_tokens=6, pad_token_id=0)

    fast = greedy()
    assert len(_cpu_quant.compiled_keys()) == 4  # q/o (32x32), k/v (16x32), gate/up (64x32), down (32x64)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "ref")
    assert torch.equal(fast, greedy())


# -- Triton (interpreted on CPU) ----------------------------------------------------------------------


triton_cases = [
    # (x shape, out_features, bits, group, asymmetric)
    ((1, 72), 45, 4, 24, False),  # decode row, ragged N and K tiles
    ((2, 3, 64), 40, 8, 64, True),  # per-channel, 3-D activations
    ((37, 48), 70, 3, 16, True),  # 3-bit codes across byte boundaries, tiled rows
    ((5, 64), 33, 2, 32, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,out_f,bits,group,asymmetric", triton_cases)
def test_triton_matches_fp64_and_the_reference(shape, out_f, bits, group, asymmetric, dtype):
    pytest.importorskip("triton")
    import compressor.kernels.triton as tri

    in_f = shape[-1]
    qweight, scales, zeros, bias = quantized(bits, out_f, in_f, group, asymmetric, dtype, seed=out_f)
    x = torch.randn(*shape).to(dtype)
    y = tri.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_f)
    assert y.shape == (*shape[:-1], out_f) and y.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2.5e-2
    assert relative_error(y, exact(x, qweight, scales, zeros, bias, bits, group, in_f)) < tolerance
    reference = ref.quant_linear(x, qweight, scales, zeros, bias, bits, group, in_f)
    assert relative_error(y, reference) < tolerance


def test_triton_launcher_has_the_reference_signature_and_is_dispatched():
    pytest.importorskip("triton")
    import compressor.kernels.triton as tri

    assert inspect.signature(tri.quant_linear) == inspect.signature(ref.quant_linear)
    qweight, scales, zeros, bias = quantized(4, 20, 32, 16, False)
    x = torch.randn(3, 32)
    y = kernels.quant_linear(x, qweight, scales, zeros, bias, 4, 16, 32, backend="triton")
    assert torch.equal(y, tri.quant_linear(x, qweight, scales, zeros, bias, 4, 16, 32))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        tri.quant_linear(x.double(), qweight, scales.double(), zeros, None, 4, 16, 32)

"""CPU inference fast path (`compressor.kernels._cpu`): same result as the reference, no copies of
the factors per call, and `cached_unpack()` reusing unpacked N:M weights only while they are valid."""

from __future__ import annotations

import sys

import compressor.kernels.dispatch as kernels
import pytest
import torch
from compressor.kernels.dispatch import compress_nm_indices, pack_nm
from compressor.kernels import _cpu, ref
from torch.profiler import ProfilerActivity, profile

# The only aten ops a factor may pass through in a forward: views and the matmuls reading it.
FACTOR_VIEWS_AND_MATMULS = {"aten::linear", "aten::t", "aten::transpose", "aten::as_strided",
                            "aten::matmul", "aten::mm", "aten::addmm"}


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("COMPRESSOR_KERNELS", raising=False)


@pytest.fixture
def reference_spy(monkeypatch):
    """Counts calls of the checked reference ops, to tell whether the fast path ran."""
    calls = []
    for name in ("low_rank_linear", "nm_linear", "dense_sparse_linear"):
        original = getattr(ref, name)

        def spy(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(ref, name, spy)
    return calls


def low_rank_operands(gen, dtype, bias: bool, shape=(3, 5, 12)):
    x = torch.randn(*shape, generator=gen).to(dtype)
    u = torch.randn(7, 4, generator=gen).to(dtype)
    v = torch.randn(4, shape[-1], generator=gen).to(dtype)
    b = torch.randn(7, generator=gen).to(dtype) if bias else None
    return x, u, v, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(12,), (1, 12), (3, 5, 12)])
def test_low_rank_fast_path_equals_the_reference(gen, dtype, bias, shape, reference_spy):
    x, u, v, b = low_rank_operands(gen, dtype, bias, shape)
    fast = kernels.low_rank_linear(x, u, v, b)
    assert reference_spy == []  # the fast path ran, not the checked reference
    assert fast.shape == (*shape[:-1], 7) and fast.dtype == dtype
    assert torch.equal(fast, ref.low_rank_linear(x, u, v, b))


@pytest.mark.parametrize("bit_packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_nm_fast_path_equals_the_reference(gen, nm_dense, bit_packed, bias, reference_spy):
    dense = nm_dense(6, 16, 2, 4, generator=gen)
    values, positions = pack_nm(dense, 2, 4)
    indices = compress_nm_indices(positions, 4) if bit_packed else positions
    x = torch.randn(2, 3, 16, generator=gen)
    b = torch.randn(6, generator=gen) if bias else None
    fast = kernels.nm_linear(x, values, indices, 2, 4, 16, b)
    assert reference_spy == []
    assert torch.equal(fast, ref.nm_linear(x, values, indices, 2, 4, 16, b))
    torch.testing.assert_close(fast, torch.nn.functional.linear(x, dense, b))


def test_dense_sparse_fast_path_equals_the_reference(gen, nm_dense, reference_spy):
    s_t = nm_dense(10, 8, 2, 4, generator=gen)  # S.T (in=10, k=8), 2:4 along k
    values, positions = pack_nm(s_t, 2, 4)
    indices = compress_nm_indices(positions, 4)
    d = torch.randn(5, 8, generator=gen)
    x = torch.randn(3, 10, generator=gen)
    fast = kernels.dense_sparse_linear(x, d, values, indices, 2, 4, 8)
    assert reference_spy == []
    assert torch.equal(fast, ref.dense_sparse_linear(x, d, values, indices, 2, 4, 8))


def test_fast_path_raises_the_reference_errors(gen):
    x, u, v, _ = low_rank_operands(gen, torch.float32, False)
    with pytest.raises(ValueError, match="`u` is torch.float64 but `x` is torch.float32"):
        kernels.low_rank_linear(x, u.double(), v.double())
    with pytest.raises(ValueError, match=r"`x` must have last dim in_features=12"):
        kernels.low_rank_linear(x[..., :5], u, v)
    with pytest.raises(ValueError, match="`x` must be a torch.Tensor"):
        kernels.low_rank_linear([1.0] * 12, u, v)
    with pytest.raises(ValueError, match="`bias` is torch.float64"):
        kernels.low_rank_linear(x, u, v, torch.zeros(7, dtype=torch.float64))


def test_fast_path_yields_to_the_environment_variable(gen, monkeypatch):
    """COMPRESSOR_KERNELS=triton must still reach the Triton backend (or fail loudly)."""
    x, u, v, _ = low_rank_operands(gen, torch.float32, False)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    with pytest.raises(kernels.KernelUnavailable, match="COMPRESSOR_KERNELS asks for the Triton"):
        kernels.low_rank_linear(x, u, v)
    monkeypatch.setenv("COMPRESSOR_KERNELS", "bogus")
    with pytest.raises(ValueError, match="COMPRESSOR_KERNELS must be one of"):
        kernels.low_rank_linear(x, u, v)


def test_low_rank_forward_reads_the_stored_factors_without_copying_them(gen):
    """A decode step of a LowRankLinear: U and V reach exactly two matmuls through views only —
    no transposed / contiguous copy of a factor is made per call (nor lazily on the first)."""
    from compressor.layers import LowRankLinear

    _, u, v, b = low_rank_operands(gen, torch.float32, True)
    layer = LowRankLinear.from_factors(u, v, b)
    x = torch.randn(8, 1, 12, generator=gen)
    factor_shapes = [list(u.shape), list(u.T.shape), list(v.shape), list(v.T.shape)]
    with torch.inference_mode():
        for _ in range(2):  # the second call looks like the first: nothing is cached lazily
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                y = layer(x)
            events = [(e.name, e.input_shapes) for e in prof.events()]
            touching = {name for name, shapes in events if any(s in factor_shapes for s in shapes)}
            assert touching <= FACTOR_VIEWS_AND_MATMULS, events
            matmuls = [name for name, _ in events if name in ("aten::mm", "aten::addmm")]
            assert len(matmuls) == 2, events
    torch.testing.assert_close(y, x @ (u @ v).T + b, rtol=1e-5, atol=1e-5)


def nm_layer_operands(gen, nm_dense):
    dense = nm_dense(6, 16, 2, 4, generator=gen)
    values, positions = pack_nm(dense, 2, 4)
    return dense, values, compress_nm_indices(positions, 4), torch.randn(4, 16, generator=gen)


def test_cached_unpack_unpacks_once_and_follows_in_place_changes(gen, nm_dense, monkeypatch):
    _, values, indices, x = nm_layer_operands(gen, nm_dense)
    unpacks = []
    monkeypatch.setattr(_cpu, "unpack_nm", lambda *a: unpacks.append(1) or ref.unpack_nm(*a))
    with torch.no_grad():
        kernels.nm_linear(x, values, indices, 2, 4, 16)
        kernels.nm_linear(x, values, indices, 2, 4, 16)
        assert len(unpacks) == 2  # outside the block: every call unpacks
        with kernels.cached_unpack():
            first = kernels.nm_linear(x, values, indices, 2, 4, 16)
            again = kernels.nm_linear(x, values, indices, 2, 4, 16)
            assert len(unpacks) == 3 and torch.equal(first, again)
            values.mul_(2.0)  # an in-place update invalidates the cached matrix
            doubled = kernels.nm_linear(x, values, indices, 2, 4, 16)
            assert len(unpacks) == 4
            torch.testing.assert_close(doubled, 2 * first)
            assert torch.equal(doubled, ref.nm_linear(x, values, indices, 2, 4, 16))
        assert kernels._unpack_cache is None  # freed on exit
        kernels.nm_linear(x, values, indices, 2, 4, 16)
        assert len(unpacks) == 5  # this call unpacks again


def test_cached_unpack_does_not_cache_through_autograd(gen, nm_dense):
    dense, values, indices, x = nm_layer_operands(gen, nm_dense)
    values.requires_grad_(True)
    with kernels.cached_unpack():
        kernels.nm_linear(x, values, indices, 2, 4, 16).sum().backward()
        assert len(kernels._unpack_cache) == 0
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_nm_layer_under_cached_unpack_matches_the_packed_forward(gen, nm_dense):
    from compressor.methods.prune import NMSparseLinear

    dense, *_ = nm_layer_operands(gen, nm_dense)
    layer = NMSparseLinear.from_dense(dense, 2, 4, torch.randn(6, generator=gen))
    x = torch.randn(3, 1, 16, generator=gen)
    with torch.inference_mode():
        packed = layer(x)
        with kernels.cached_unpack():
            cached = [layer(x) for _ in range(3)]
    for y in cached:
        assert torch.equal(y, packed)

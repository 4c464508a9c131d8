"""Every Triton kernel against fp64 maths and its reference, through every launch path.

On CPU these run under TRITON_INTERPRET=1 (set by the conftests), with small blocks and a
pretended 4-SM device, so the shapes below reach: decode with split-K (fp32 atomics), decode
without split, the narrow-output plan and the tiled plan, each with ragged edges.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

pytest.importorskip("triton")

import compressor.kernels.dispatch as kernels  # noqa: E402
import compressor.kernels.triton as tri  # noqa: E402
from compressor.kernels.dispatch import compress_nm_indices, pack_nm  # noqa: E402
from compressor.kernels import ref  # noqa: E402
from compressor.kernels.triton._linear import nm_fast_path, plan  # noqa: E402

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (x shape, out_features): names say which launch plan the main matmul takes.
SHAPES = {
    "gemv-split-k": ((1, 72), 45),
    "decode-3d": ((2, 3, 40), 70),
    "narrow-out": ((37, 40), 24),
    "tiled": ((37, 72), 70),
}


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def _nm(gen, rows, cols, n=2, m=4):
    scores = torch.rand(rows, cols, generator=gen)
    return _randn(gen, rows, cols) * kernels.nm_mask(scores, n, m)


def _packed(dense, n=2, m=4, compact=True):
    values, indices = pack_nm(dense, n, m)
    return values, compress_nm_indices(indices, m) if compact else indices


# Each op has a builder (fp64 arguments with outputs of order 1) and an independent dense fp64
# formula; the formula is applied to the arguments after rounding them to the test dtype, so the
# tolerance measures the kernel's arithmetic, not the rounding of its inputs.
def build_low_rank(gen, x, out_f, bias):
    in_f, rank = x.shape[-1], 20
    return (
        x,
        _randn(gen, out_f, rank, scale=rank**-0.5),
        _randn(gen, rank, in_f, scale=in_f**-0.5),
        bias,
    )


def exact_low_rank(x, u, v, bias):
    return x @ (u @ v).T + _or0(bias)


def build_nm(gen, x, out_f, bias):
    values, indices = _packed(_nm(gen, out_f, x.shape[-1]) * x.shape[-1] ** -0.5)
    return x, values, indices, 2, 4, x.shape[-1], bias


def exact_nm(x, values, indices, n, m, in_f, bias):
    return x @ kernels.unpack_nm(values, indices, n, m, in_f).T + _or0(bias)


def build_dense_sparse(gen, x, out_f, bias):
    k = 24
    s_values, s_indices = _packed(_nm(gen, x.shape[-1], k) * x.shape[-1] ** -0.5)  # S.T (in, k)
    return x, _randn(gen, out_f, k, scale=k**-0.5), s_values, s_indices, 2, 4, k, bias


def exact_dense_sparse(x, d, s_values, s_indices, n, m, k, bias):
    s = kernels.unpack_nm(s_values, s_indices, n, m, k).T  # (k, in)
    return x @ (d @ s).T + _or0(bias)


def build_lora(gen, x, out_f, bias):
    in_f, r = x.shape[-1], 8
    w = _randn(gen, out_f, in_f, scale=in_f**-0.5)
    a, b = _randn(gen, r, in_f, scale=in_f**-0.5), _randn(gen, out_f, r, scale=r**-0.5)
    return x, w, a, b, 0.5, bias


def exact_lora(x, w, a, b, scaling, bias):
    return x @ (w + scaling * b @ a).T + _or0(bias)


def build_dsee(gen, x, out_f, bias):
    _, w, a, b, scaling, _ = build_lora(gen, x, out_f, None)
    return (x, w, a, b, scaling, *_coo(gen, out_f, x.shape[-1]), bias)


def exact_dsee(x, w, a, b, scaling, rows, cols, vals, bias):
    return exact_lora(x, w + _dense_delta(rows, cols, vals, w.shape), a, b, scaling, bias)


def build_dsee_nm(gen, x, out_f, bias):
    _, values, indices, n, m, in_f, _ = build_nm(gen, x, out_f, None)
    _, _, a, b, scaling, _ = build_lora(gen, x, out_f, None)
    return (x, values, indices, n, m, in_f, a, b, scaling, *_coo(gen, out_f, in_f), bias)


def exact_dsee_nm(x, values, indices, n, m, in_f, a, b, scaling, rows, cols, vals, bias):
    w = kernels.unpack_nm(values, indices, n, m, in_f)
    return exact_dsee(x, w, a, b, scaling, rows, cols, vals, bias)


def _coo(gen, out_f, in_f, nnz=30):
    """COO delta with random (possibly repeated) coordinates: rows, cols, values."""
    rows = torch.randint(0, out_f, (nnz,), generator=gen)
    cols = torch.randint(0, in_f, (nnz,), generator=gen)
    return rows, cols, _randn(gen, nnz, scale=0.5)


def _dense_delta(rows, cols, vals, shape):
    return torch.zeros(shape, dtype=F64).index_put_((rows, cols), vals, accumulate=True)


def _or0(bias):
    return 0.0 if bias is None else bias


OPS = {
    "low_rank_linear": (build_low_rank, exact_low_rank),
    "nm_linear": (build_nm, exact_nm),
    "dense_sparse_linear": (build_dense_sparse, exact_dense_sparse),
    "lora_linear": (build_lora, exact_lora),
    "dsee_linear": (build_dsee, exact_dsee),
    "dsee_nm_linear": (build_dsee_nm, exact_dsee_nm),
}


def _cast(args, dtype):
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_triton_matches_fp64_and_reference(op, shape, dtype, tolerance, max_error):
    build, exact_fn = OPS[op]
    gen = torch.Generator().manual_seed(sorted(OPS).index(op) * 100 + sorted(SHAPES).index(shape))
    x_shape, out_f = SHAPES[shape]
    bias = _randn(gen, out_f) if shape != "decode-3d" else None
    args = _cast(build(gen, _randn(gen, *x_shape), out_f, bias), dtype)
    exact = exact_fn(*_cast(args, F64))
    y_triton = getattr(tri, op)(*args)
    y_ref = getattr(ref, op)(*args)
    assert y_triton.shape == y_ref.shape == (*x_shape[:-1], out_f)
    assert y_triton.dtype == dtype
    assert max_error(y_triton, exact) <= tolerance[dtype], "triton vs fp64"
    assert max_error(y_ref, exact) <= tolerance[dtype], "reference vs fp64"


# 2:4, 1:4, 4:8, 1:2 take the contiguous-load tile expansion; 2:3 and 1:16 (one 4-bit index per
# 16-wide tile: half a byte) take the per-entry gather.
NM_PATTERNS = [(1, 4, False), (4, 8, True), (1, 2, True), (2, 3, True), (1, 16, True)]


@pytest.mark.parametrize("n,m,compact", NM_PATTERNS)
def test_nm_linear_other_patterns_and_index_layouts(n, m, compact, tolerance, max_error, gen):
    in_f = 48
    w = _nm(gen, 20, in_f, n, m)
    x, bias = _randn(gen, 3, in_f), _randn(gen, 20)
    values, indices = _packed(w, n, m, compact)
    args = _cast((x, values, indices, n, m, in_f, bias), torch.float32)
    assert max_error(tri.nm_linear(*args), x @ w.T + bias) <= tolerance[torch.float32]


@pytest.mark.parametrize("n,m,compact", [(4, 8, False), (2, 3, True)])
def test_dense_sparse_other_patterns(n, m, compact, tolerance, max_error, gen):
    s_t, d, x = _nm(gen, 40, 24, n, m), _randn(gen, 30, 24), _randn(gen, 5, 40)
    s_values, s_indices = _packed(s_t, n, m, compact)
    args = _cast((x, d, s_values, s_indices, n, m, 24, None), torch.float32)
    assert max_error(tri.dense_sparse_linear(*args), x @ s_t @ d.T) <= tolerance[torch.float32]


def test_fast_expansion_is_chosen_only_where_tiles_hold_whole_groups_and_bytes():
    assert nm_fast_path(2, 4, 2) and nm_fast_path(2, 4, 8) and nm_fast_path(4, 8, 4)
    assert not nm_fast_path(2, 3, 2)  # m not a power of two
    assert not nm_fast_path(1, 16, 4)  # a 16-wide tile holds one 4-bit index: half a byte
    assert not nm_fast_path(1, 32, 8)  # groups wider than the smallest tile


def test_dsee_ignores_nothing_when_the_delta_is_empty(tolerance, max_error, gen):
    x, w, a, b, s, _ = _cast(build_lora(gen, _randn(gen, 2, 40), 24, None), torch.float32)
    empty_i, empty_v = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    exact = exact_lora(*_cast((x, w, a, b, s, None), F64))
    y = tri.dsee_linear(x, w, a, b, s, empty_i, empty_i, empty_v)
    assert max_error(y, exact) <= tolerance[torch.float32]


def test_strided_inputs_are_read_through_their_strides(tolerance, max_error, gen):
    x = _randn(gen, 40, 5).T.float()  # (5, 40), non-contiguous
    u, v = _randn(gen, 72, 6).float(), _randn(gen, 40, 6).float().T  # v (6, 40) transposed view
    exact = x.double() @ (u.double() @ v.double()).T
    assert max_error(tri.low_rank_linear(x, u, v), exact) <= tolerance[torch.float32]


def test_plan_covers_the_sms_and_splits_only_when_needed():
    assert plan(1, 4096, 4096, 132, 256) == (16, 16, 1)  # 256 output tiles: no split
    assert plan(1, 11008, 4096, 132, 256) == (16, 64, 1)  # widest tile that still fills the SMs
    block_m, block_n, split = plan(1, 512, 4096, 132, 256)  # rank-sized stage 1
    assert (block_m, block_n) == (16, 16) and math.ceil(512 / 16) * split >= 132
    assert plan(4096, 16, 4096, 132, 256)[:2] == (32, 16)  # t = x @ A.T at large batch


@pytest.mark.parametrize("op", [*OPS, "mezo_axpy_"])
def test_triton_launcher_has_the_reference_signature(op):
    assert inspect.signature(getattr(tri, op)) == inspect.signature(getattr(ref, op))


def test_dispatcher_runs_the_triton_kernel_when_asked(gen):
    x, u, v, _ = _cast(build_low_rank(gen, _randn(gen, 2, 40), 24, None), torch.float32)
    assert torch.equal(
        kernels.low_rank_linear(x, u, v, backend="triton"), tri.low_rank_linear(x, u, v)
    )


def test_triton_rejects_float64_and_bad_shapes_like_the_reference(gen):
    x, u, v = _randn(gen, 2, 8), _randn(gen, 5, 2), _randn(gen, 2, 8)
    with pytest.raises(ValueError, match="support float32/float16/bfloat16"):
        tri.low_rank_linear(x, u, v)
    with pytest.raises(ValueError, match=r"`v` must be \(rank, in\)"):
        tri.low_rank_linear(x.float(), u.float(), v[:1].float())

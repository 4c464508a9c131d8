"""The references are the specification: check each against plain dense fp64 maths."""

from __future__ import annotations

import inspect

import compressor.kernels.dispatch as kernels
import pytest
import torch
from compressor.kernels.dispatch import compress_nm_indices, pack_nm
from compressor.kernels import ref

F64 = torch.float64
OPS = [
    "low_rank_linear",
    "nm_linear",
    "dense_sparse_linear",
    "lora_linear",
    "dsee_linear",
    "dsee_nm_linear",
    "mezo_axpy_",
]


def _randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def test_low_rank_is_the_product_of_the_factors(gen):
    x, u, v, b = _randn(gen, 2, 3, 10), _randn(gen, 7, 4), _randn(gen, 4, 10), _randn(gen, 7)
    dense = u @ v
    torch.testing.assert_close(ref.low_rank_linear(x, u, v, b), x @ dense.T + b)
    torch.testing.assert_close(ref.low_rank_linear(x, u, v), x @ dense.T)


@pytest.mark.parametrize("compact", [False, True])
def test_nm_linear_is_the_dense_product(compact, nm_dense, gen):
    w = nm_dense(5, 16, 2, 4, F64, gen)
    values, indices = pack_nm(w, 2, 4)
    indices = compress_nm_indices(indices, 4) if compact else indices
    x, b = _randn(gen, 3, 16), _randn(gen, 5)
    torch.testing.assert_close(ref.nm_linear(x, values, indices, 2, 4, 16, b), x @ w.T + b)


def test_dense_sparse_is_x_times_d_s_transposed(nm_dense, gen):
    s_t = nm_dense(12, 8, 2, 4, F64, gen)  # S.T (in=12, k=8): n of m along k for each input
    s = s_t.T  # (k, in): every column of S keeps 2 of each 4 consecutive k-entries
    assert torch.all((s.reshape(2, 4, 12) != 0).sum(1) == 2)
    d, x, b = _randn(gen, 6, 8), _randn(gen, 4, 12), _randn(gen, 6)
    s_values, s_indices = pack_nm(s_t, 2, 4)
    y = ref.dense_sparse_linear(x, d, s_values, s_indices, 2, 4, 8, b)
    torch.testing.assert_close(y, x @ (d @ s).T + b)


def _lora_inputs(gen, out_f=6, in_f=9, r=3):
    return (
        _randn(gen, 4, in_f),
        _randn(gen, out_f, in_f),
        _randn(gen, r, in_f),
        _randn(gen, out_f, r),
    )


def test_lora_is_the_merged_weight(gen):
    x, w, a, b_lora = _lora_inputs(gen)
    bias = _randn(gen, 6)
    merged = w + 0.7 * b_lora @ a
    torch.testing.assert_close(ref.lora_linear(x, w, a, b_lora, 0.7, bias), x @ merged.T + bias)


def _coo(gen, out_f, in_f, nnz):
    rows = torch.randint(0, out_f, (nnz,), generator=gen)
    cols = torch.randint(0, in_f, (nnz,), generator=gen)
    vals = _randn(gen, nnz)
    dense = torch.zeros(out_f, in_f, dtype=F64).index_put_((rows, cols), vals, accumulate=True)
    return rows, cols, vals, dense


def test_dsee_is_the_merged_weight_with_duplicate_coordinates_summed(gen):
    x, w, a, b_lora = _lora_inputs(gen)
    rows, cols, vals, delta = _coo(gen, 6, 9, 40)  # 40 draws on 54 cells: duplicates certain
    merged = w + 0.5 * b_lora @ a + delta
    y = ref.dsee_linear(x, w, a, b_lora, 0.5, rows, cols, vals)
    torch.testing.assert_close(y, x @ merged.T)


def test_dsee_nm_is_the_merged_weight(nm_dense, gen):
    x, _, a, b_lora = _lora_inputs(gen, out_f=6, in_f=12)
    w = nm_dense(6, 12, 2, 4, F64, gen)
    values, indices = pack_nm(w, 2, 4)
    rows, cols, vals, delta = _coo(gen, 6, 12, 5)
    bias = _randn(gen, 6)
    merged = w + 0.25 * b_lora @ a + delta
    y = ref.dsee_nm_linear(x, values, indices, 2, 4, 12, a, b_lora, 0.25, rows, cols, vals, bias)
    torch.testing.assert_close(y, x @ merged.T + bias)


def test_references_are_differentiable(nm_dense, gen):
    """Layers train through the reference (the Triton kernels are forward-only)."""
    x = _randn(gen, 2, 8).requires_grad_()
    values, indices = pack_nm(nm_dense(3, 8, 2, 4, F64, gen), 2, 4)
    values.requires_grad_()
    rows, cols, vals, _ = _coo(gen, 3, 8, 4)
    vals.requires_grad_()
    a, b_lora = _randn(gen, 2, 8).requires_grad_(), _randn(gen, 3, 2).requires_grad_()
    inputs = (x, values, a, b_lora, vals)

    def dsee_nm(x, values, a, b_lora, vals):
        return ref.dsee_nm_linear(x, values, indices, 2, 4, 8, a, b_lora, 0.5, rows, cols, vals)

    assert torch.autograd.gradcheck(dsee_nm, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_keeps_the_input_dtype(dtype, gen):
    x, u, v = (
        _randn(gen, 3, 8, dtype=dtype),
        _randn(gen, 5, 2, dtype=dtype),
        _randn(gen, 2, 8, dtype=dtype),
    )
    assert ref.low_rank_linear(x, u, v).dtype == dtype


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda g: ref.low_rank_linear(_randn(g, 2, 8), _randn(g, 5, 3), _randn(g, 2, 8)),
            r"`v` must be \(rank, in\) with rank=3",
        ),
        (
            lambda g: ref.low_rank_linear(_randn(g, 2, 7), _randn(g, 5, 2), _randn(g, 2, 8)),
            "`x` must have last dim in_features=8",
        ),
        (
            lambda g: ref.low_rank_linear(
                _randn(g, 2, 8, dtype=torch.float32), _randn(g, 5, 2), _randn(g, 2, 8)
            ),
            "`u` is torch.float64 but `x` is torch.float32",
        ),
        (
            lambda g: ref.lora_linear(
                _randn(g, 2, 8),
                _randn(g, 5, 8),
                _randn(g, 2, 8),
                _randn(g, 5, 2),
                1.0,
                _randn(g, 4),
            ),
            r"`bias` must have shape \(5,\)",
        ),
        (
            lambda g: ref.lora_linear(
                _randn(g, 2, 8), _randn(g, 5, 8), _randn(g, 2, 8), _randn(g, 5, 2), "1"
            ),
            "`scaling` must be a real number",
        ),
        (
            lambda g: ref.nm_linear(_randn(g, 2, 8), _randn(g, 3, 4), torch.zeros(3, 4), 2, 4, 8),
            "`indices` must be a 2-D uint8 tensor",
        ),
        (
            lambda g: ref.nm_linear(
                _randn(g, 2, 8), _randn(g, 3, 5), torch.zeros(3, 5, dtype=torch.uint8), 2, 4, 8
            ),
            r"`values` must have shape \(3, 4\)",
        ),
        (
            lambda g: ref.dsee_linear(
                _randn(g, 2, 8),
                _randn(g, 5, 8),
                _randn(g, 2, 8),
                _randn(g, 5, 2),
                1.0,
                torch.zeros(3, dtype=torch.int32),
                torch.zeros(3, dtype=torch.int64),
                _randn(g, 3),
            ),
            "`delta_rows` must be a 1-D int64 tensor",
        ),
        (lambda g: ref.mezo_axpy_(_randn(g, 4, 4).T, 0, 0, 1.0), "`param` must be contiguous"),
        (lambda g: ref.mezo_axpy_(_randn(g, 4), -1, 0, 1.0), "`seed` must be an int >= 0"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_parameter(call, message, gen):
    with pytest.raises(ValueError, match=message):
        call(gen)


@pytest.mark.parametrize("name", OPS)
def test_every_op_is_documented_and_exposed_with_a_backend_argument(name):
    reference, public = getattr(ref, name), getattr(kernels, name)
    assert reference.__doc__ and public.__doc__
    expected = list(inspect.signature(reference).parameters) + ["backend"]
    assert list(inspect.signature(public).parameters) == expected

"""N:M masks, packing and bit-packed indices (pure torch; no Triton needed)."""

from __future__ import annotations

import pytest
import torch
from compressor.kernels.dispatch import (
    compress_nm_indices,
    expand_nm_indices,
    nm_index_bits,
    nm_mask,
    pack_nm,
    unpack_nm,
)

PATTERNS = [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (2, 3), (5, 16)]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_nm_mask_keeps_exactly_n_largest_per_group(n, m, gen):
    scores = torch.randn(7, 5 * m, generator=gen)
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups, kept = scores.view(7, 5, m), mask.view(7, 5, m)
    assert torch.all(kept.sum(-1) == n)
    smallest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = groups.masked_fill(kept, float("-inf")).amax(-1)
    assert torch.all(smallest_kept >= largest_dropped)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_unpack_round_trip(n, m, dtype, nm_dense, gen):
    dense = nm_dense(6, 4 * m, n, m, dtype, gen)
    values, indices = pack_nm(dense, n, m)
    assert values.shape == indices.shape == (6, 4 * n)
    assert values.dtype == dtype and indices.dtype == torch.uint8
    assert torch.equal(unpack_nm(values, indices, n, m, 4 * m), dense)
    compact = compress_nm_indices(indices, m)
    assert torch.equal(unpack_nm(values, compact, n, m, 4 * m), dense)


def test_pack_pads_sparse_groups_with_distinct_zero_slots():
    dense = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 1.0, 2.0, 0.0, 0.0]])
    values, indices = pack_nm(dense, 2, 4)
    assert indices.tolist() == [[0, 1, 0, 2, 0, 1]]  # ascending, distinct inside each group
    assert values.tolist() == [[0.0, 0.0, 0.0, 3.0, 1.0, 2.0]]
    assert torch.equal(unpack_nm(values, indices, 2, 4, 12), dense)


def test_pack_keeps_leading_dims(nm_dense, gen):
    dense = nm_dense(6, 8, 2, 4, torch.float32, gen).view(2, 3, 8)
    values, indices = pack_nm(dense, 2, 4)
    assert values.shape == (2, 3, 4)
    assert torch.equal(unpack_nm(values, indices, 2, 4, 8), dense)


@pytest.mark.parametrize("m,bits", [(2, 1), (3, 2), (4, 2), (8, 4), (16, 4), (17, 8), (256, 8)])
def test_index_bits_and_compress_round_trip(m, bits, gen):
    assert nm_index_bits(m) == bits
    slots = 11  # not a multiple of indices-per-byte: the last byte is partly padding
    indices = torch.randint(0, m, (3, slots), generator=gen, dtype=torch.int32).to(torch.uint8)
    compact = compress_nm_indices(indices, m)
    assert compact.shape == (3, -(-slots * bits // 8))
    assert torch.equal(expand_nm_indices(compact, 1, m, slots), indices)


def test_two_four_indices_take_two_bits_each():
    indices = torch.tensor([[0, 3, 1, 2, 2, 3, 0, 1]], dtype=torch.uint8)
    compact = compress_nm_indices(indices, 4)
    assert compact.tolist() == [[0 | 3 << 2 | 1 << 4 | 2 << 6, 2 | 3 << 2 | 0 << 4 | 1 << 6]]


@pytest.mark.parametrize(
    "dense,n,m,message",
    [
        (torch.ones(2, 6), 2, 4, "not a multiple of `m`=4"),
        (torch.ones(2, 8), 4, 4, "need 1 <= `n` < `m`"),
        (torch.ones(2, 8), 0, 4, "need 1 <= `n` < `m`"),
        (
            torch.tensor([[1.0, 0, 0, 0, 1, 1, 1, 0]]),
            2,
            4,
            r"group 1 \(entries 4..7\) of row 0 has 3",
        ),
    ],
)
def test_pack_rejects_bad_input(dense, n, m, message):
    with pytest.raises(ValueError, match=message):
        pack_nm(dense, n, m)


def test_unpack_rejects_wrong_index_width():
    values = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="one uint8 per value"):
        unpack_nm(values, torch.zeros(2, 3, dtype=torch.uint8), 2, 4, 8)
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_nm(values, torch.zeros(2, 4, dtype=torch.int64), 2, 4, 8)

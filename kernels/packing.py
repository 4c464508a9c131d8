"""N:M semi-structured sparsity: masks, packing and unpacking (pure torch, any device).

Layout used by every N:M kernel in `compressor.kernels`: a matrix (rows, cols) whose last dim is
split into groups of `m` consecutive entries, each group holding at most `n` non-zeros, is stored as

* `values`  (rows, cols // m * n), same dtype as the matrix: the kept entries of each group;
* `indices` (rows, cols // m * n) uint8: each kept entry's position inside its group (0..m-1),
  ascending and distinct inside a group (the kernels rely on distinct positions; `pack_nm`
  guarantees them, and results for hand-made duplicates are backend-specific).

Exactly `n` slots are stored per group; a group with fewer non-zeros is filled with explicit zeros
at its lowest unused positions, so every slot has a real position.

For the kernels the indices may also be *bit-packed* (`compress_nm_indices`): `nm_index_bits(m)`
bits per index, `8 // bits` indices per byte, slot `j` in byte `j // per_byte` at bit
`(j % per_byte) * bits`. For 2:4 that is 2 bits per index, which is what makes a bf16 2:4 weight
1.78x smaller than dense instead of 1.33x with one byte per index. Every function taking `indices`
accepts either layout; the shape tells them apart.

Integer codes of weight-only quantization (`pack_int` / `unpack_int`): unsigned b-bit codes,
b in {2, 3, 4, 8}, packed along each row, lowest bits first: code j of a row occupies bits
[j·b, (j+1)·b) of that row's little-endian bit stream, so a row of `cols` codes takes
ceil(cols·b/8) bytes (for b = 4, byte k = c[2k] | c[2k+1] << 4; for b = 3, eight codes per three
bytes, codes straddling byte boundaries).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "check_int_bits",
    "check_nm",
    "compress_nm_indices",
    "expand_nm_indices",
    "nm_index_bits",
    "nm_mask",
    "pack_int",
    "pack_nm",
    "packed_int_bytes",
    "unpack_int",
    "unpack_nm",
]

INT_BITS = (2, 3, 4, 8)


def check_nm(n: int, m: int, cols: int, where: str = "N:M") -> None:
    """Raise ValueError unless 1 <= n < m <= 256 and `cols` is a multiple of m."""
    if not (isinstance(n, int) and isinstance(m, int)):
        raise ValueError(f"{where}: `n` and `m` must be ints, got n={n!r}, m={m!r}")
    if not 1 <= n < m:
        raise ValueError(f"{where}: need 1 <= `n` < `m`, got n={n}, m={m}; e.g. n=2, m=4 for 2:4")
    if m > 256:
        raise ValueError(f"{where}: `m` must be <= 256 (positions are stored as uint8), got {m}")
    if cols % m != 0:
        raise ValueError(
            f"{where}: the packed dim has {cols} entries, not a multiple of `m`={m}; "
            f"pad it to {math.ceil(cols / m) * m} or choose another m"
        )


def nm_index_bits(m: int) -> int:
    """Bits per position in the bit-packed layout: the smallest of 1, 2, 4, 8 that is >= log2 m."""
    need = max(1, math.ceil(math.log2(m)))
    return next(bits for bits in (1, 2, 4, 8) if bits >= need)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the `n` largest scores of every group of `m` along the last dim.

    scores (..., cols) any float dtype, cols % m == 0  ->  bool (..., cols) with exactly n True
    per group (ties broken by `torch.topk`).
    """
    check_nm(n, m, scores.shape[-1], "nm_mask")
    groups = scores.reshape(*scores.shape[:-1], -1, m)  # (..., G, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)


def pack_nm(dense: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """Pack a matrix with <= n non-zeros per group of m (last dim) into (values, indices).

    dense (..., cols), cols % m == 0  ->  values (..., cols//m*n) dense.dtype,
    indices (..., cols//m*n) uint8 (one position per value; see the module docstring).
    Raises ValueError if a group holds more than n non-zeros.
    """
    cols = dense.shape[-1]
    check_nm(n, m, cols, "pack_nm")
    groups = dense.reshape(*dense.shape[:-1], cols // m, m)  # (..., G, m)
    nonzero = groups != 0
    _raise_if_overfull(nonzero, n, m)
    # Rank positions: non-zeros first, then the lowest positions, so padding slots land on zeros.
    position = torch.arange(m, device=dense.device)
    rank = nonzero.to(torch.int32) * (2 * m) + (m - 1 - position).to(torch.int32)
    kept = rank.topk(n, dim=-1).indices.sort(dim=-1).values  # (..., G, n) ascending
    values = groups.gather(-1, kept)
    lead = dense.shape[:-1]
    return values.reshape(*lead, -1), kept.to(torch.uint8).reshape(*lead, -1)


def _raise_if_overfull(nonzero: Tensor, n: int, m: int) -> None:
    counts = nonzero.sum(dim=-1)  # (..., G)
    if bool((counts > n).any()):
        where = (counts > n).nonzero()[0].tolist()
        *row, group = where
        raise ValueError(
            f"pack_nm: group {group} (entries {group * m}..{group * m + m - 1}) of row "
            f"{tuple(row) if len(row) != 1 else row[0]} has {int(counts[tuple(where)])} non-zeros, "
            f"more than n={n} of m={m}; apply `nm_mask(scores, {n}, {m})` to the matrix first"
        )


def unpack_nm(values: Tensor, indices: Tensor, n: int, m: int, cols: int) -> Tensor:
    """Inverse of `pack_nm`: values (..., cols//m*n), indices (either layout) -> dense (..., cols).

    Slots with the same position in a group are summed (padding zeros are harmless either way).
    """
    check_nm(n, m, cols, "unpack_nm")
    slots = cols // m * n
    if values.shape[-1] != slots:
        raise ValueError(
            f"unpack_nm: `values` last dim is {values.shape[-1]}, expected cols//m*n = {slots} "
            f"(cols={cols}, n={n}, m={m})"
        )
    positions = expand_nm_indices(indices, n, m, slots).long()
    lead = values.shape[:-1]
    if positions.shape[:-1] != lead:
        raise ValueError(
            f"unpack_nm: `indices` leading shape {tuple(positions.shape[:-1])} differs from "
            f"`values` {tuple(lead)}"
        )
    groups = torch.zeros(*lead, cols // m, m, dtype=values.dtype, device=values.device)
    groups.scatter_add_(-1, positions.reshape(*lead, -1, n), values.reshape(*lead, -1, n))
    return groups.reshape(*lead, cols)


def compress_nm_indices(indices: Tensor, m: int) -> Tensor:
    """Bit-pack positions: uint8 (..., slots) -> uint8 (..., ceil(slots * bits / 8)).

    bits = nm_index_bits(m); slot j sits in byte j // (8 // bits) at bit (j % (8 // bits)) * bits.
    """
    if indices.dtype != torch.uint8:
        raise ValueError(f"compress_nm_indices: `indices` must be uint8, got {indices.dtype}")
    bits = nm_index_bits(m)
    per_byte = 8 // bits
    slots = indices.shape[-1]
    padded = torch.nn.functional.pad(indices.to(torch.int32), (0, (-slots) % per_byte))
    chunks = padded.reshape(*indices.shape[:-1], -1, per_byte)  # (..., bytes, per_byte)
    shifts = torch.arange(per_byte, device=indices.device, dtype=torch.int32) * bits
    return (chunks << shifts).sum(dim=-1).to(torch.uint8)


def expand_nm_indices(indices: Tensor, n: int, m: int, slots: int) -> Tensor:
    """Return one uint8 position per slot (..., slots), from either index layout."""
    if indices.dtype != torch.uint8:
        raise ValueError(f"N:M `indices` must be uint8, got {indices.dtype}")
    if indices.shape[-1] == slots:
        return indices
    bits = nm_index_bits(m)
    per_byte = 8 // bits
    packed_len = math.ceil(slots / per_byte)
    if bits == 8 or indices.shape[-1] != packed_len:
        raise ValueError(
            f"N:M `indices` last dim is {indices.shape[-1]}; expected {slots} (one uint8 per "
            f"value) or {packed_len} (bit-packed by compress_nm_indices, {bits} bits each) for "
            f"n={n}, m={m}"
        )
    shifts = torch.arange(per_byte, device=indices.device, dtype=torch.int32) * bits
    unpacked = (indices.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return unpacked.reshape(*indices.shape[:-1], -1)[..., :slots].to(torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """bool (rows, cols) -> uint8 (rows, ceil(cols / 8)): bit j of byte b is column 8b + j
    (numpy.packbits(..., bitorder="little"), the layout of compressed-tensors' bitmasks)."""
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-mask.shape[-1]) % 8))
    bits = padded.reshape(*mask.shape[:-1], -1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, cols: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 (rows, ceil(cols / 8)) -> bool (rows, cols)."""
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :cols].bool()


# -- integer codes of weight-only quantization -----------------------------------------------------


def check_int_bits(bits: object, where: str = "int codes") -> int:
    """Raise ValueError unless `bits` is one of the supported code widths (2, 3, 4, 8)."""
    if isinstance(bits, bool) or bits not in INT_BITS:
        raise ValueError(f"{where}: `bits` must be one of {list(INT_BITS)}, got {bits!r}")
    return int(bits)


def packed_int_bytes(cols: int, bits: int) -> int:
    """Bytes per row of `cols` packed b-bit codes: ceil(cols·bits / 8)."""
    return -(-cols * bits // 8)


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (rows, cols), each < 2**bits -> uint8 (rows, ceil(cols·bits/8)), lowest bits first."""
    check_int_bits(bits, "pack_int")
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack_int: `codes` must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 8:
        return codes.clone()
    cols = codes.shape[1]
    stream = _code_bits(codes, bits)  # (rows, cols·bits) of 0/1, code-major, lowest bit first
    stream = torch.nn.functional.pad(stream, (0, (-stream.shape[1]) % 8))
    weights = 1 << torch.arange(8, dtype=torch.int32, device=codes.device)
    packed = (stream.reshape(codes.shape[0], -1, 8).to(torch.int32) * weights).sum(-1)
    return packed[:, : packed_int_bytes(cols, bits)].to(torch.uint8)


def _code_bits(codes: Tensor, bits: int) -> Tensor:
    """The bit stream of each row: bit i of code j at position j·bits + i."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    return ((codes.unsqueeze(-1) >> shifts) & 1).reshape(codes.shape[0], -1)


def unpack_int(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of `pack_int`: uint8 (rows, ceil(cols·bits/8)) -> uint8 codes (rows, cols)."""
    check_int_bits(bits, "unpack_int")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int: `packed` must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_int_bytes(cols, bits):
        raise ValueError(
            f"unpack_int: `packed` has {packed.shape[1]} bytes per row; {cols} codes of {bits} bits "
            f"take {packed_int_bytes(cols, bits)}"
        )
    if bits == 8:
        return packed
    if 8 % bits == 0:  # whole codes per byte: one shift per slot, no bit stream needed
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(packed.shape[0], -1)[:, :cols]
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(packed.shape[0], -1)[:, : cols * bits].reshape(packed.shape[0], cols, bits)
    weights = 1 << torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (stream * weights).sum(-1, dtype=torch.uint8)

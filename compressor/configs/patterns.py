"""Sparsity pattern strings ("2:4", "unstructured") as configs write them, parsed without torch.

The configs of prune and dsformer validate their `pattern` with `parse_nm`; the masks themselves
(`methods/_sparse_pattern.SparsePattern`) are built from the same parse.
"""

from __future__ import annotations

MAX_M = 256  # an index inside a group of M must fit the stored uint8


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """`"2:4"` -> (2, 4); `"unstructured"` -> None.

    Raises ValueError with the reason; the config turns it into a ConfigError.
    """
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"got {pattern!r}; use 'N:M' such as '2:4', or 'unstructured'")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"got {pattern!r}: need 0 < N < M (N = M would make S dense; use svd)")
    if m > MAX_M:
        raise ValueError(f"got {pattern!r}: M must be <= {MAX_M} so an index fits the stored uint8")
    return n, m

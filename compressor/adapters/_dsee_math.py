"""DSEE's pure numerics: GreBsmo's low-rank + sparse split, the sparse support Ω, global
magnitude masks and FLOP counts (see dsee.py). Tensors in, tensors out; no model, no config."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers.dsee import sparse_dense  # noqa: F401  (re-exported)
from ..methods._sparse_pattern import unstructured_mask


def hard_threshold(x: Tensor, threshold: float) -> Tensor:
    """x with every entry of |x| < threshold set to 0."""
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def grebsmo(
    weight: Tensor, *, iterations: int = 100, inner: int = 2, threshold: float = 0.01,
    rank_step: int = 5, max_rank: int | None = None, seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Greedy low-rank + sparse split W ≈ U V + S, as DSEE's run_glue.py runs it.

    weight (m, n) -> U (m, r) with orthonormal columns, V (r, n), S (m, n) hard-thresholded.
    Starts from a random rank-1 V; each outer iteration alternates U ← Q(QR((W − S)Vᵀ)),
    V ← Uᵀ(W − S), S ← hard-threshold(W − U V) `inner` times, then appends the first `rank_step`
    rows of R from the QR of the residual W − U V − S to V, up to `max_rank` and not after the
    last iteration (so the returned U V is the fitted one, rank 1 + (iterations − 1)·rank_step).
    """
    w = weight.detach().float()
    m, n = w.shape
    max_rank = min(max_rank or min(m, n), min(m, n))
    v = torch.randn(1, n, generator=torch.Generator().manual_seed(seed)).to(w.device)
    s = torch.zeros_like(w)
    u = torch.zeros(m, 1, device=w.device)
    # S carries over between outer iterations (GreBsmo's warm start); the reference script
    # resets it for the query matrix only, which reaches the same fixed point more slowly.
    for outer in range(iterations):
        for _ in range(inner):
            u = torch.linalg.qr((w - s) @ v.T).Q  # (m, r)
            v = u.T @ (w - s)  # (r, n)
            s = hard_threshold(w - u @ v, threshold)
        if v.shape[0] < max_rank and outer < iterations - 1:
            residual = w - u @ v - s
            grow = torch.linalg.qr(residual).R[:rank_step]  # (<= rank_step, n)
            v = torch.cat([v, grow[: max_rank - v.shape[0]]])
    return u, v, s


def top_support(scores: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) int64 of the `num` largest |scores| entries, in row-major order."""
    flat = scores.detach().abs().reshape(-1)
    chosen = flat.topk(min(num, flat.numel())).indices.sort().values
    return chosen // scores.shape[1], chosen % scores.shape[1]


def random_support(shape: tuple[int, int], num: int, seed: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of `num` distinct uniformly random entries (DSEE's `rp` baseline)."""
    order = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(seed))
    chosen = order[:num].sort().values
    return chosen // shape[1], chosen % shape[1]


def global_magnitude_masks(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Keep-masks removing the `ratio` smallest scores over all matrices together (global L1)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = unstructured_mask(flat[None, :], ratio).reshape(-1)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def layer_flops(out_features: int, in_features: int, nonzero: int,
                adapter: tuple[int, int] = (0, 0)) -> int:
    """FLOPs per token (2 × multiply-adds): `nonzero` base weights + LoRA r(m+n) + S₂'s N."""
    rank, num_sparse = adapter
    return 2 * (nonzero + rank * (out_features + in_features) + num_sparse)

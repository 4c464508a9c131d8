"""The SVD sweep shared by `analyze` and KappaTune: σ of each selected linear, cached by weight
hash. A plain helper (it registers no method), so KappaTune uses it without registering `analyze`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..context import Context
from ..errors import ModelError
from ..offload import MaterializedWeights
from ..targeting import select_linears
from . import cache, spectra


def layer_spectra(model: nn.Module, targets=(), ignore=(), *, ctx: Context | None = None, use_cache: bool = True,
                  max_dim: int = 16384) -> tuple[dict[str, torch.Tensor], int]:
    """σ (descending, fp32, CPU) for each selected linear; returns (spectra, cache hits)."""
    modules = select_linears(model, targets, ignore)
    weights = MaterializedWeights(modules)  # reads accelerate-offloaded weights one at a time
    check_finite(weights)
    device = ctx.device if ctx is not None else torch.device("cpu")
    result, hits = {}, 0
    names = list(modules)
    iterator = ctx.progress(names, "SVD sweep") if ctx is not None else names
    for name in iterator:
        weight = weights[name]
        if max(weight.shape) > max_dim:
            continue
        key = cache.weight_key(weight) if use_cache else None
        sigma = cache.load_spectrum(key) if key else None
        if sigma is None:
            sigma = spectra.singular_values(weight.to(device)).cpu()
            if key:
                cache.store_spectrum(key, sigma)
        else:
            hits += 1
        result[name] = sigma
    return result, hits


def check_finite(weights: Mapping[str, torch.Tensor]) -> None:
    bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
    if bad:
        shown = ", ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
        raise ModelError(f"{len(bad)} layer(s) hold NaN/Inf weights: {shown}; the checkpoint is corrupt — "
                         "re-export it or restore the original weights")

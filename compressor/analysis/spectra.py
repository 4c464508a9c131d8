"""Pure spectral maths on singular values: KappaTune's κ, effective/stable rank, WeLore's tail.

All functions take a 1-D tensor of singular values sorted descending (torch.linalg.svdvals).
"""

from __future__ import annotations

import math

import torch

from ..configs.analyze import KAPPA_EPS  # noqa: F401  (the config, declared there; re-exported)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """σ of W reshaped to (out, -1), computed in fp32 (KappaTune/WeLore both use fp32)."""
    return torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).float())


def condition_number(sigma: torch.Tensor, eps: float = KAPPA_EPS) -> float:
    """κ = σ_max / (σ_min + eps)."""
    return float(sigma[0] / (sigma[-1] + eps))


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli's entropy rank: exp(H(p)) with p = σ / Σσ; 1 ≤ erank ≤ len(σ)."""
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(sigma: torch.Tensor) -> float:
    """‖W‖_F² / ‖W‖_2² = Σσ² / σ_max²."""
    if sigma[0] <= 0:
        return 0.0
    return float((sigma.double() ** 2).sum() / sigma[0].double() ** 2)


def welore_normalise(sigma: torch.Tensor) -> torch.Tensor:
    """WeLore's min-max normalised spectrum, (σ − min σ) / (max σ − min σ) ∈ [0, 1]."""
    low, high = sigma.min(), sigma.max()
    if high <= low:
        return torch.ones_like(sigma)
    return (sigma - low) / (high - low)


def welore_removed(normalised: torch.Tensor, tau: float) -> int:
    """Ranks WeLore removes from one matrix at threshold τ: #{i : σ̂_i < τ}."""
    return int((normalised < tau).sum())


def welore_reduction(spectra: list[torch.Tensor], tau: float) -> float:
    """Total rank reduction Σp / Σ min(m, n) at a global threshold τ."""
    removed = sum(welore_removed(welore_normalise(s), tau) for s in spectra)
    return removed / max(sum(len(s) for s in spectra), 1)


def welore_tau(spectra: list[torch.Tensor], target: float, iterations: int = 50) -> float:
    """The global τ whose rank reduction is closest to `target` from below, by bisection.

    The reduction is a non-decreasing step function of τ, so bisection finds the largest τ
    whose reduction does not exceed the target (WeLore tunes τ per model; we search it).
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"WeLore target reduction must be in [0, 1), got {target}")
    normalised = [welore_normalise(s) for s in spectra]
    values = torch.cat(normalised).sort().values
    low, high = 0.0, 1.0 + 1e-6
    total = len(values)
    for _ in range(iterations):
        mid = (low + high) / 2
        if int((values < mid).sum()) / total <= target:
            low = mid
        else:
            high = mid
    return low


def is_low_rank_component(removed: int, full_rank: int, min_ratio: float = 0.5) -> bool:
    """WeLore's LRC verdict: more than `min_ratio` of the rank removed (continual-FT default)."""
    return full_rank > 0 and removed / full_rank > min_ratio


def kappatune_select(kappas: dict[str, float], *, top_p: float | None = 0.2, num_modules: int | None = None,
                     threshold: float | None = None) -> list[str]:
    """Lowest-κ names, by peft's precedence: num_modules, then top_p, then threshold, else all."""
    ordered = sorted(kappas, key=lambda n: (kappas[n], n))
    if num_modules is not None:
        return ordered[:num_modules]
    if top_p is not None:
        return ordered[: max(1, math.floor(top_p * len(ordered)))]
    if threshold is not None:
        return [n for n in ordered if kappas[n] <= threshold]
    return ordered

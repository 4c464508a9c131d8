"""`analyze`: one SVD sweep over the selected linears — spectra, κ (KappaTune), effective and
stable rank, WeLore's normalised tail, the ranks WeLore would remove and its LRC/N-LRC verdict."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MethodConfig
from ..context import Context
from ..errors import ConfigError
from ..registry import register
from ..report.records import StageResult
from ..targeting import layer_type, linear_shape, select_linears
from . import spectra
from .sweep import layer_spectra


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig(MethodConfig):
    """Args:
        top_p: KappaTune selects the lowest-κ fraction of tensors (paper and peft default 0.2).
        welore_reduction: the total rank reduction WeLore targets; τ is found by bisection.
        lrc_min_ratio: a matrix is a low-rank component when more than this fraction of its rank
            is removed (WeLore's continual fine-tuning default, 0.5).
        max_dim: skip tensors with a dimension above this (KappaTune's 16384 default).
        kappa_eps: κ = σmax / (σmin + eps).
        use_cache: reuse spectra cached from an earlier run on identical weights.
    """

    top_p: float = 0.2
    welore_reduction: float = 0.5
    lrc_min_ratio: float = 0.5
    max_dim: int = 16384
    kappa_eps: float = spectra.KAPPA_EPS
    use_cache: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"analyze: `top_p` must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.welore_reduction < 1.0:
            raise ConfigError(f"analyze: `welore_reduction` must be in [0, 1), got {self.welore_reduction}")
        if not 0.0 <= self.lrc_min_ratio < 1.0:
            raise ConfigError(f"analyze: `lrc_min_ratio` must be in [0, 1), got {self.lrc_min_ratio}")


def layer_record(name: str, shape: tuple[int, int], sigma: torch.Tensor, config: AnalyzeConfig, tau: float) -> dict:
    full_rank = len(sigma)
    removed = spectra.welore_removed(spectra.welore_normalise(sigma), tau)
    return {
        "module": name, "type": layer_type(name), "shape": list(shape),
        "kappa": spectra.condition_number(sigma, config.kappa_eps),
        "sigma_max": float(sigma[0]), "sigma_min": float(sigma[-1]),
        "effective_rank": spectra.effective_rank(sigma), "stable_rank": spectra.stable_rank(sigma),
        "full_rank": full_rank, "welore_removed": removed, "welore_kept": full_rank - removed,
        "lrc": spectra.is_low_rank_component(removed, full_rank, config.lrc_min_ratio),
        "spectrum": [float(s) for s in sigma],
    }


@register("analyze", AnalyzeConfig, kind="analyze")
def apply(model: nn.Module, config: AnalyzeConfig, ctx: Context) -> StageResult:
    start = time.perf_counter()
    sigmas, hits = layer_spectra(model, config.targets, config.ignore, ctx=ctx, use_cache=config.use_cache,
                                 max_dim=config.max_dim)
    svd_seconds = time.perf_counter() - start
    tau = spectra.welore_tau(list(sigmas.values()), config.welore_reduction)
    modules = select_linears(model, config.targets, config.ignore)
    rows = [layer_record(n, tuple(linear_shape(modules[n])), s, config, tau) for n, s in sigmas.items()]
    kappas = {r["module"]: r["kappa"] for r in rows}
    selected = set(spectra.kappatune_select(kappas, top_p=config.top_p))
    for row in rows:
        row["kappatune_selected"] = row["module"] in selected
    removed = sum(r["welore_removed"] for r in rows)
    return StageResult(
        metrics={
            "layers": len(rows), "welore_tau": tau,
            "welore_reduction_reached": removed / max(sum(r["full_rank"] for r in rows), 1),
            "welore_lrc_layers": sum(r["lrc"] for r in rows),
            "kappatune_selected": len(selected), "svd_seconds": svd_seconds, "cache_hits": hits,
        },
        per_module=rows, modified_model=False,
    )

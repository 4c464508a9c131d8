"""`analyze`: one SVD sweep over the selected linears — spectra, κ (KappaTune), effective and
stable rank, WeLore's normalised tail, the ranks WeLore would remove and its LRC/N-LRC verdict."""

from __future__ import annotations

import shlex
import time
from collections import Counter

import torch
from torch import nn

from ..configs.analyze import AnalyzeConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ..targeting import layer_type, linear_shape, select_linears
from . import spectra
from .sweep import layer_spectra


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


@register(AnalyzeConfig)
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
        notes=next_steps(rows, ctx.model_source if ctx is not None else "default", config),
        metrics={
            "layers": len(rows), "welore_tau": tau,
            "welore_reduction_reached": removed / max(sum(r["full_rank"] for r in rows), 1),
            "welore_lrc_layers": sum(r["lrc"] for r in rows),
            "kappatune_selected": len(selected), "svd_seconds": svd_seconds, "cache_hits": hits,
        },
        per_module=rows, modified_model=False,
    )


def next_steps(rows: list[dict], model_source: str, config: AnalyzeConfig) -> list[str]:
    """What to do with the sweep: which matrices are low-rank enough to factor (WeLore's
    low-rank components) and the commands that factor them."""
    model = "" if model_source in ("default", "", None) else " " + shlex.quote(str(model_source))
    low_rank = Counter(r["type"] for r in rows if r["lrc"])
    totals = Counter(r["type"] for r in rows)
    if not low_rank:
        return [(f"next: no matrix is low-rank by its spectrum alone (WeLore finds no low-rank component at a "
                 f"{config.welore_reduction:.0%} rank reduction); calibrated methods may still compress it: "
                 f"`compressor compress{model} --method saes-svd --rank 0.8 --out compressed-saes-svd`")]
    mostly = [t for t in totals if low_rank[t] * 2 > totals[t]]  # layer types, in model order
    summary = ", ".join(f"{t} {low_rank[t]}/{totals[t]}" for t in totals if low_rank[t])
    found = (f"next: {sum(low_rank.values())} of {len(rows)} matrices are low-rank enough to factor (more than "
             f"{config.lrc_min_ratio:.0%} of their rank removable): {summary}")
    welore = (f"next: factor each with its own rank (WeLore): `compressor compress{model} --method welore --rank 0.5 "
              "--out compressed-welore`")
    lines = [found, welore]
    if mostly:
        targets = " ".join(f"--targets {t}" for t in mostly)
        lines.append(f"next: or only the mostly low-rank types, calibrated: `compressor compress{model} --method "
                     f"saes-svd --rank 0.6 {targets} --out compressed-saes-svd`")
    return lines

"""WeLore LRC tuning (Jaiswal et al., arXiv 2407.11239): after WeLore compression, train only the
low-rank components' factors U', V' (`LowRankLinear.u`, `.v`). The dense N-LRCs, embeddings and
lm_head stay frozen. The paper's continual fine-tuning uses AdamW lr 5e-5 with a cosine schedule;
downstream tuning 1e-4. Any compressed model whose layers include LowRankLinear qualifies.

This is the general `heal` stage (compressor/adapters/heal.py) restricted to the low-rank layers,
with WeLore's learning rate; `welore-tune` stays as the name recipes already use.
"""

from __future__ import annotations

from torch import nn

from ..configs.welore_tune import WeLoreTuneConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..errors import ConfigError
from ..layers import LowRankLinear
from ..registry import register
from ..report.records import StageResult
from ..targeting import matches
from ._common import with_default_lr
from ._heal_train import heal


def low_rank_components(model: nn.Module, targets=(), ignore=()) -> dict[str, LowRankLinear]:
    """The LowRankLinear layers (WeLore's LRCs) selected by targets/ignore."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not found:
        raise ConfigError(
            "welore-tune: the model has no low-rank (LowRankLinear) layers to tune; run "
            "`compressor compress --method welore MODEL --out DIR` first and pass DIR as the model"
        )
    chosen = {
        n: m
        for n, m in found.items()
        if (not targets or any(matches(n, t) for t in targets))
        and not any(matches(n, i) for i in ignore)
    }
    if not chosen:
        raise ConfigError(
            f"welore-tune: `targets` {list(targets)} (ignore={list(ignore)}) matched none of the "
            f"{len(found)} low-rank layers, e.g. {list(found)[:4]}"
        )
    return chosen


@register(WeLoreTuneConfig)
def apply(model: nn.Module, config: WeLoreTuneConfig, ctx: Context) -> StageResult:
    """Fine-tune only the LRC factors of a WeLore-compressed model (`heal` on low-rank layers)."""
    config = with_default_lr(config, adamw=5e-5, mezo=1e-6)
    layers = low_rank_components(model, config.targets, config.ignore)
    result = heal(model, config, ctx, method="welore-tune", layers=layers)
    result.metrics["lrc_layers"] = len(layers)
    return result

"""WeLore LRC tuning (Jaiswal et al., arXiv 2407.11239): after WeLore compression, train only the
low-rank components' factors U', V' (`LowRankLinear.u`, `.v`). The dense N-LRCs, embeddings and
lm_head stay frozen. The paper's continual fine-tuning uses AdamW lr 5e-5 with a cosine schedule;
downstream tuning 1e-4. Any compressed model whose layers include LowRankLinear qualifies.

Its config (see compressor/configs/__init__.py); the method is compressor/adapters/welore_tune.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .heal import HealFields


@dataclass(frozen=True, kw_only=True)
class WeLoreTuneConfig(HealFields,
                       method="welore-tune", kind="finetune",
                       apply="compressor.adapters.welore_tune"):
    """Args (plus every `HealConfig` / `TrainConfig` field):
    targets: restrict training to these low-rank layers (same syntax); empty = every one.
    ignore: low-rank layers to keep frozen.
    train_bias: also train the low-rank layers' biases.
    schedule: "cosine" by default (WeLore's continual fine-tuning).
    lr: None = 5e-5 with adamw (WeLore), 1e-6 with mezo.
    """

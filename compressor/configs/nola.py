"""NOLA: LoRA factors as linear combinations of frozen random bases (Koohpayegani et al.,
ICLR 2024, arXiv 2310.02556; reference code UCDvision/NOLA).

Its config (see compressor/configs/__init__.py); the method is compressor/adapters/nola.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .train import TrainConfig


@dataclass(frozen=True, kw_only=True)
class NolaConfig(TrainConfig, method="nola", kind="finetune", apply="compressor.adapters.nola"):
    """Args (plus every `TrainConfig` field; `targets` default to every linear but `lm_head`):
    r: the rank, the inner dimension of A and B (official LLaMA setting 16).
    alpha: ΔW is scaled by alpha / r (official LLaMA setting 4).
    num_basis_a: k, random bases (= trainable coefficients) for A per layer (paper: 512).
    num_basis_b: l, the same for B.
    cache_bases: keep the bases in memory instead of regenerating them in every forward and
        backward pass (faster; k·r·in + l·out·r more floats per layer).
    merge: after training, fold ΔW into the weights (plain nn.Linear, outputs unchanged).
    lr: None = 1e-3 with adamw (NOLA's LLaMA recipe), 5e-5 with mezo.
    """

    renamed: ClassVar[dict[str, str]] = {"rank": "r (peft's name for the adapter rank)"}

    r: int = 16
    alpha: float = 4.0
    num_basis_a: int = 512
    num_basis_b: int = 512
    cache_bases: bool = False
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("r", "num_basis_a", "num_basis_b"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"nola: `{key}` must be an integer >= 1, got {value!r}; the "
                                  "paper uses r 16 with 512 bases per factor")
        if not self.alpha > 0:
            raise ConfigError(f"nola: `alpha` must be > 0, got {self.alpha}; ΔW is scaled by "
                              "alpha / r (official LLaMA setting: 4)")

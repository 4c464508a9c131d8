"""LoRA through Hugging Face peft (Hu et al., arXiv 2106.09685): y = W₀x + (α/r)·B A x with
A (r, in) Kaiming-uniform and B (out, r) zero, so the model is unchanged at step 0.

Its config (see compressor/configs/__init__.py); the method is compressor/adapters/lora.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .train import TrainConfig


def check_lora_fields(method: str, r: int, alpha: float, dropout: float,
                      prefix: str = "") -> None:
    """ConfigError for a bad LoRA r / alpha / dropout (`prefix` names kappatune's fields)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{method}: `{prefix}r` must be an integer >= 1, got {r!r}; e.g. 8")
    if not alpha > 0:
        raise ConfigError(f"{method}: `{prefix}alpha` must be > 0, got {alpha}; the update is "
                          "scaled by alpha / r")
    if not 0 <= dropout < 1:
        raise ConfigError(f"{method}: `{prefix}dropout` must be in [0, 1), got {dropout}")


@dataclass(frozen=True, kw_only=True)
class LoraConfig(TrainConfig, method="lora", kind="finetune", apply="compressor.adapters.lora"):
    """Args (plus every `TrainConfig` field; `targets` default to every attention and MLP linear):
    r: the adapter rank (peft's name; METHODS default 8).
    alpha: lora_alpha; the update is scaled by alpha / r (default 16; peft's own is 8).
    dropout: dropout on the adapter's input during training (0.05).
    merge: after training, fold B A into the weights (plain nn.Linear, outputs unchanged).
    lr: None = 2e-4 with adamw (the QLoRA/KappaTune-peft rate), 5e-5 with mezo (MeZO-LoRA).
    """

    renamed: ClassVar[dict[str, str]] = {"rank": "r (peft's name for the adapter rank)"}

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_fields("lora", self.r, self.alpha, self.dropout)

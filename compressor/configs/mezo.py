"""MeZO: memory-efficient zeroth-order SGD (SPSA with the seed trick). Paper: arXiv 2305.17333.

Its config (see compressor/configs/__init__.py); the method is compressor/training/mezo.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .train import TrainConfig


@dataclass(frozen=True, kw_only=True)
class MezoConfig(TrainConfig, method="mezo", kind="finetune", apply="compressor.training.mezo"):
    """MeZO fine-tuning. All `TrainConfig` fields apply (`optimizer` is always "mezo").

    Args:
        adapter: None = perturb the full weights (or the linears named by `targets`);
            "lora" = inject LoRA adapters into the `targets` linears (as the `lora` stage does)
            and train only those; `lr` then defaults to 5e-5 and the paper uses mezo_eps 1e-2.
        lora_r: LoRA rank (peft's `r`) when `adapter` is "lora".
        lora_alpha: LoRA scaling numerator (the update is alpha/r * B A).
    """

    optimizer: str = "mezo"
    adapter: str | None = None
    renamed: ClassVar[dict[str, str]] = {"lora_rank": "lora_r (peft's name for the adapter rank)"}

    lora_r: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer != "mezo":
            raise ConfigError(
                f"mezo: `optimizer` must be 'mezo', got {self.optimizer!r}; use `backprop` for AdamW"
            )
        if self.adapter not in (None, "lora"):
            raise ConfigError(
                f"mezo: `adapter` must be null (full weights) or 'lora', got {self.adapter!r}"
            )
        if self.lora_r < 1:
            raise ConfigError(f"mezo: `lora_r` must be >= 1, got {self.lora_r}")

"""`heal`: train only the compressed parameters of a compressed model, after compression.

Its config (see compressor/configs/__init__.py); the method is compressor/adapters/heal.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .train import TrainConfig

LOSSES = ("lm", "kl")


@dataclass(frozen=True, kw_only=True)
class HealFields(TrainConfig):
    """Args (plus every `TrainConfig` field):
    targets: restrict healing to these compressed layers (same syntax); empty = every one.
    ignore: compressed layers to keep frozen.
    loss: `lm` (next-token loss on `data`) or `kl` (distillation from the dense teacher's logits).
    teacher: with `kl`, `source` (the model this run loaded, before compression) or a model
        path / id; it must be dense.
    temperature: distillation temperature (the KL is scaled by T² so gradients keep their size).
    train_bias: also train the healed layers' biases.
    pruned_linears: also heal plain linears that are ≥ 20 % exact zeros (unstructured pruning),
        non-zeros only.
    lora_r: rank of the optional LoRA pairs (see the module docstring); 0 = none.
    lr: None = 1e-4 with adamw, 1e-6 with mezo.
    """

    loss: str = "lm"
    teacher: str = "source"
    temperature: float = 1.0
    train_bias: bool = False
    pruned_linears: bool = True
    schedule: str = "cosine"
    lora_r: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.method_name or "heal"
        if self.loss not in LOSSES:
            raise ConfigError(f"{name}: `loss` must be `lm` or `kl`, got {self.loss!r}")
        if not self.temperature > 0:
            raise ConfigError(f"{name}: `temperature` must be > 0, got {self.temperature!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ConfigError(f"{name}: `lora_r` must be an integer >= 0 (0 = no LoRA), got {self.lora_r!r}")
        if self.loss == "kl" and self.task != "lm":
            raise ConfigError(f"{name}: `loss: kl` distils next-token logits and needs `task: lm`")


@dataclass(frozen=True, kw_only=True)
class HealConfig(HealFields, method="heal", kind="finetune", apply="compressor.adapters.heal"):
    """The `heal` stage's fields (`HealFields`, above; the training is
    compressor/adapters/_heal_train.py)."""

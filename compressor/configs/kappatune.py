"""KappaTune: fine-tune only the best-conditioned tensors (O. Ludwig, arXiv 2506.16289; peft's
KappaTuneSelector).

Its config (see compressor/configs/__init__.py); the method is compressor/adapters/kappatune.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from .lora import check_lora_fields
from .train import TrainConfig

DEFAULT_TOP_P = 0.2


@dataclass(frozen=True, kw_only=True)
class KappaTuneConfig(TrainConfig,
                      method="kappatune", kind="finetune", apply="compressor.adapters.kappatune"):
    """Args (plus every `TrainConfig` field; `targets` / `ignore` restrict the candidates):
    top_p: tune the lowest-κ fraction of candidates, k = max(1, floor(top_p · count)).
    num_modules: tune the N lowest-κ candidates.
    threshold: tune every candidate with κ <= threshold.
        Set at most one of the three; none set = top_p 0.2 (the paper's and peft's default).
    max_dim: skip tensors with a dimension above this (peft: 16384).
    mode: "lora" (LoRA on the selected modules) or "full" (the selected weights themselves).
    lora_r, lora_alpha, lora_dropout: the LoRA of mode "lora" (hf_integration: 16, 32, 0.05).
    use_cache: reuse cached spectra of identical weights (see compressor.analysis.cache).
    merge: mode "lora": fold the adapter into the weights after training.
    lr: None = adamw 5e-5 (full) / 2e-4 (lora); mezo 1e-6 (full) / 5e-5 (lora).
    """

    top_p: float | None = None
    num_modules: int | None = None
    threshold: float | None = None
    max_dim: int = 16384
    mode: str = "lora"
    renamed: ClassVar[dict[str, str]] = {"lora_rank": "lora_r (peft's name for the adapter rank)"}

    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    use_cache: bool = True
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        rules = [k for k in ("top_p", "num_modules", "threshold") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise ConfigError(f"kappatune: set one of `top_p`, `num_modules`, `threshold`, got "
                              f"{', '.join(rules)}; remove all but one")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"kappatune: `top_p` must be in (0, 1], got {self.top_p}; the paper "
                              "uses 0.2")
        modules = self.num_modules
        if modules is not None and (isinstance(modules, bool) or modules < 1):
            raise ConfigError(f"kappatune: `num_modules` must be an integer >= 1, got {modules!r}")
        if self.mode not in ("full", "lora"):
            raise ConfigError(f"kappatune: `mode` must be 'full' or 'lora', got {self.mode!r}")
        if self.max_dim < 1:
            raise ConfigError(f"kappatune: `max_dim` must be >= 1, got {self.max_dim}; peft uses "
                              "16384")
        check_lora_fields("kappatune", self.lora_r, self.lora_alpha, self.lora_dropout, "lora_")

    def selection_rule(self) -> dict[str, Any]:
        """The one rule in force, as keyword arguments of `spectra.kappatune_select`."""
        if self.num_modules is None and self.threshold is None:
            return {"top_p": self.top_p if self.top_p is not None else DEFAULT_TOP_P}
        return {"top_p": None, "num_modules": self.num_modules, "threshold": self.threshold}

"""LoRA through Hugging Face peft (Hu et al., arXiv 2106.09685): y = W₀x + (α/r)·B A x with
A (r, in) Kaiming-uniform and B (out, r) zero, so the model is unchanged at step 0.

peft injects and trains the adapter; the stage then writes it in peft's own format
(`<out>/adapter/adapter_model.safetensors` + `adapter_config.json`, loadable with
`peft.PeftModel.from_pretrained(base, folder)` as is: `base_model_name_or_path` is the model the
user passed, `task_type` is set). Unmerged, that folder is the run's only model output: no model
folder that would pass for the base is written. Afterwards the in-memory model holds either plain
merged nn.Linear layers (`merge: true`, peft's merge_and_unload; the run then writes the merged
model) or `LoraLinear` layers (forward = `compressor.kernels.lora_linear`), which the pipeline's
top-level `merge` folds. A base loaded in 4/8 bit (`load_in`) keeps peft's layers instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ..training import TrainConfig
from ._common import (
    adapter_targets,
    refuse_compressed,
    with_default_lr,
)
from ._peft_lora import check_lora_fields, train_lora


@dataclass(frozen=True, kw_only=True)
class LoraConfig(TrainConfig):
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


@register("lora", LoraConfig, kind="finetune")
def apply(model: nn.Module, config: LoraConfig, ctx: Context) -> StageResult:
    """LoRA on the target linears via peft; the module docstring says what the model holds after."""
    config = with_default_lr(config, adamw=2e-4, mezo=5e-5)
    modules = adapter_targets(model, config.targets, config.ignore)
    refuse_compressed("lora", modules)
    return train_lora(model, list(modules), config, ctx, rank=config.r, alpha=config.alpha,
                      dropout=config.dropout, merge=config.merge, method="lora")

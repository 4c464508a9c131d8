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

from torch import nn

from ..configs.lora import LoraConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ._common import (
    adapter_targets,
    refuse_compressed,
    with_default_lr,
)
from ._peft_lora import train_lora


@register(LoraConfig)
def apply(model: nn.Module, config: LoraConfig, ctx: Context) -> StageResult:
    """LoRA on the target linears via peft; the module docstring says what the model holds after."""
    config = with_default_lr(config, adamw=2e-4, mezo=5e-5)
    modules = adapter_targets(model, config.targets, config.ignore)
    refuse_compressed("lora", modules)
    return train_lora(model, list(modules), config, ctx, rank=config.r, alpha=config.alpha,
                      dropout=config.dropout, merge=config.merge, method="lora")

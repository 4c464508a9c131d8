"""compressor's quantizer for transformers' plug-in API (registered by compressor.hf_register).

`from_pretrained(DIR)` on a compressed checkpoint: the config's layer table is checked against
the freshly built (meta-device) model, each listed linear is replaced by its compressed layer,
and only then do the weights load, so memory holds the compressed tensors only. Imported lazily,
after transformers has loaded its own quantizer table.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .ckpt_format import (
    FORMAT_VERSION,
    QUANT_METHOD,
    check_layer_table,
    check_stored_tensors,
    check_version,
    placeholder_names,
    stored_shapes,
)


class CompressorConfig(QuantizationConfigMixin):
    """`quantization_config` of a compressed checkpoint: the versioned layer table plus metadata."""

    def __init__(self, layers: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION,
                 **metadata: Any) -> None:
        check_version(format_version)
        metadata.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = dict(layers or {})
        for key, value in metadata.items():
            setattr(self, key, value)


class CompressorQuantizer(HfQuantizer):
    """Rebuilds compressed layers before weight loading; loads pre-compressed checkpoints only."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .layers import build_layer, link_quantized_embeddings
        from .layers.base import replace_module

        source = getattr(model.config, "_name_or_path", "") or ""
        where = f"checkpoint `{source or type(model).__name__}`"
        check_layer_table(model, self.quantization_config.layers, where)
        if source and Path(source).is_dir():  # a missing factor would otherwise stay uninitialised memory
            check_stored_tensors(self.quantization_config.layers, stored_shapes(source), where)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        built = {}
        with torch.device("meta"):
            for name, spec in self.quantization_config.layers.items():
                built[name] = build_layer(spec, dtype=dtype)
                replace_module(model, name, built[name])
        link_quantized_embeddings(model)  # a quantized tied lm_head reads the embedding's codes
        for name in built:  # parents' _init_weights may reach for `child.weight` (GPT-2's c_proj): every
            parent = model.get_submodule(name.rpartition(".")[0])  # tensor they own is loaded anyway
            parent._is_hf_initialized = True
        ignored = {re.escape(key) + "$" for key in placeholder_names(built)}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignored
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():  # seeded non-persistent buffers (NOLA's bases) are rebuilt
            if hasattr(module, "rebuild_buffers"):
                module.rebuild_buffers()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

"""Compressed layer classes, one module per kind, and the table that rebuilds them by type name.

Importing this package fills `LAYER_TYPES` with every kind (low-rank, N:M sparse, dense x sparse,
LoRA, NOLA, DSEE, weight-only quantized). The kinds import only torch and `compressor.kernels.dispatch`, so rebuilding a
checkpoint's layers never imports the method registry, peft or a method module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import LAYER_TYPES, CompressedLinear, dense_linear, register_layer, replace_module
from .dense_sparse import DenseSparseLinear
from .dsee import DseeLinear
from .lora import LoraLinear
from .low_rank import LowRankLinear
from .nm_sparse import NMSparseLinear
from .nola import NolaLinear
from .quant_embedding import QuantEmbedding, QuantTiedHead, link_quantized_embeddings
from .quantized import QuantLinear, QuantLowRankLinear, QuantNMLinear

__all__ = [
    "LAYER_TYPES", "CompressedLinear", "DenseSparseLinear", "DseeLinear", "LoraLinear",
    "LowRankLinear", "NMSparseLinear", "NolaLinear", "QuantEmbedding", "QuantLinear", "QuantLowRankLinear",
    "QuantNMLinear", "QuantTiedHead", "build_layer", "compressed_layers", "dense_linear", "link_quantized_embeddings",
    "layer_manifest", "merge_compressed", "register_layer",
]


def compressed_layers(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def layer_manifest(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {type, args}} for every compressed layer (the checkpoint's layer table)."""
    return {n: {"type": m.layer_type, "args": m.init_args()} for n, m in compressed_layers(model).items()}


def build_layer(spec: dict[str, Any], dtype: torch.dtype | None = None) -> CompressedLinear:
    """An empty layer of the kind and shapes `spec` = {type, args} names (floats in `dtype`)."""
    from ..errors import ModelError

    kind = spec.get("type")
    if kind not in LAYER_TYPES:
        raise ModelError(f"unknown compressed layer type `{kind}` in the checkpoint's layer table "
                         f"(known: {sorted(LAYER_TYPES)}); upgrade compressor")
    return LAYER_TYPES[kind](**spec.get("args", {}), dtype=dtype)


def merge_compressed(model: nn.Module) -> int:
    """Replace every CompressedLinear with an equivalent nn.Linear; returns how many."""
    layers = compressed_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear())
    return len(layers)

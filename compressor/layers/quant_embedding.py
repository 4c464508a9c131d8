"""A weight-only quantized input embedding, and the tied output head that reads the same codes.

`QuantEmbedding` stores the (vocab, hidden) table like `QuantLinear` stores a weight: packed b-bit
codes along the hidden dimension, one scale (and, asymmetric, a zero point) per group of hidden
columns. A lookup dequantizes only the gathered rows, so the table stays packed in memory.

When the model ties its output projection to the embedding (`config.tie_word_embeddings`),
`QuantTiedHead` takes lm_head's place: it owns no tensor and computes the logits with the
embedding's packed codes through the kernels dispatcher's `quant_linear`, so the checkpoint holds
one copy, as a tied checkpoint does. `link_quantized_embeddings` joins the two after any rebuild
(quantization, `compressor.load`, `from_pretrained`) and drops the pair from transformers' table of
tied parameters, whose tying would look for a dense `weight` neither module has.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import dispatch as kernels
from .base import CompressedLinear, register_layer
from .quantized import _copy_codes, _init_codes


@register_layer
class QuantEmbedding(CompressedLinear):
    """A (num_embeddings=out_features, embedding_dim=in_features) lookup table of b-bit codes with
    groups of `group_size` along the embedding dimension; its dense weight is the (vocab, hidden)
    matrix a tied lm_head multiplies by."""

    layer_type = "quant_embedding"
    is_lookup = True  # a table indexed by token ids: never a target of a linear method

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 64,
                 symmetric: bool = True, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"QuantEmbedding: group_size={group_size} must divide the embedding dim {in_features}")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        _init_codes(self, "", out_features, in_features, bits, group_size, symmetric, dtype, device)

    @classmethod
    def from_codes(cls, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
                   embedding_dim: int) -> QuantEmbedding:
        """A table holding packed codes (`pack_int`, one row per token) and their scales / zero points."""
        layer = cls(embedding_dim, qweight.shape[0], bits, group_size, zeros is None,
                    dtype=scales.dtype, device=scales.device)
        _copy_codes(layer, "", qweight, scales, zeros)
        return layer

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric}

    def dense_weight(self) -> Tensor:
        return kernels.dequantize_int(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                      self.in_features)

    def forward(self, input_ids: Tensor) -> Tensor:
        ids = input_ids.reshape(-1)
        zeros = None if self.zeros is None else self.zeros[ids]
        rows = kernels.dequantize_int(self.qweight[ids], self.scales[ids], zeros, self.bits, self.group_size,
                                      self.in_features)
        return rows.reshape(*input_ids.shape, self.in_features)

    def to_linear(self) -> nn.Embedding:
        """What `--merge` puts back: a plain nn.Embedding of the dequantized table (not a linear)."""
        return nn.Embedding.from_pretrained(self.dense_weight().detach(), freeze=False)

    def extra_repr(self) -> str:
        grid = "symmetric" if self.symmetric else "asymmetric"
        return (f"num_embeddings={self.out_features}, embedding_dim={self.in_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {grid}")


@register_layer
class QuantTiedHead(CompressedLinear):
    """lm_head tied to a QuantEmbedding: logits = h Ŵᵀ with Ŵ the embedding's dequantized codes.
    Holds no tensor of its own; `tie` points it at the embedding (not a registered child, so the
    codes are stored and moved once, with the embedding)."""

    layer_type = "quant_tied_head"

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        self._source: tuple[QuantEmbedding, ...] = ()

    def tie(self, embedding: QuantEmbedding) -> None:
        if (embedding.out_features, embedding.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"QuantTiedHead: the embedding is {embedding.out_features}x{embedding.in_features}, "
                             f"the head {self.out_features}x{self.in_features}")
        self._source = (embedding,)

    @property
    def embedding(self) -> QuantEmbedding:
        if not self._source:
            raise RuntimeError("QuantTiedHead is not tied to its quantized embedding; load the checkpoint with "
                               "compressor.load or from_pretrained after `import compressor`")
        return self._source[0]

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def dense_weight(self) -> Tensor:
        return self.embedding.dense_weight()

    def forward(self, x: Tensor) -> Tensor:
        e = self.embedding
        return kernels.quant_linear(x, e.qweight, e.scales, e.zeros, None, e.bits, e.group_size, e.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the quantized embedding"


def link_quantized_embeddings(model: nn.Module) -> None:
    """Tie every QuantTiedHead to the model's (quantized) input embedding, and drop their names
    from transformers' tied-parameter table (both modules hold packed codes, no `weight`).
    ValueError when a head has no quantized embedding of its shape to read."""
    heads = [m for m in model.modules() if isinstance(m, QuantTiedHead)]
    if heads:
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if not isinstance(embedding, QuantEmbedding):
            raise ValueError("a quantized tied lm_head needs the model's input embedding quantized too "
                             f"(found {type(embedding).__name__})")
        for head in heads:
            head.tie(embedding)
    _drop_tied_keys(model)


def _drop_tied_keys(model: nn.Module) -> None:
    packed = {name for name, m in model.named_modules() if isinstance(m, (QuantEmbedding, QuantTiedHead))}
    if not packed:
        return

    def keep(key: str) -> bool:
        return key.rpartition(".")[0] not in packed

    for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
        table = getattr(model, attr, None)
        if isinstance(table, dict):  # an instance copy: the class's table serves other models
            setattr(model, attr, {k: v for k, v in table.items() if keep(k) and keep(v)})

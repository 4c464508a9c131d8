"""gptq: weight-only quantization with second-order error feedback (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv 2210.17323).

Its config (see compressor/configs/__init__.py); the method is compressor/methods/gptq.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CalibrationConfig
from ..errors import ConfigError
from .quant import INT_BITS, QuantFields


@dataclass(frozen=True, kw_only=True)
class GPTQConfig(CalibrationConfig, QuantFields, num_windows=128,
                 method="gptq", kind="compress", apply="compressor.methods.gptq"):
    """GPTQ weight-only quantization (see QuantFields for bits, group_size, symmetric).

    Args:
        act_order: quantize columns by descending diag(H) (the paper's act-order heuristic), group
            parameters from the original weight (static groups).
        dampening: λ added to diag(H) as a fraction of its mean (the paper's 0.01).
        block_size: columns per lazy-update block (the paper's 128; rounded to whole groups).
        correction_rank: r > 0 stores a rank-r low-rank correction of the quantization residual
            (W ≈ Q + U·V, whitened by the calibration inputs); 0 = none.
        target_bytes: B > 0 chooses each matrix's format (bits, group size, correction rank) so that
            model.safetensors takes at most B × the dense bfloat16 checkpoint's bytes (embeddings
            included), by calibration loss per byte (`_byte_allocation`); `bits` and `group_size`
            are then replaced by the options below. 0 = one format for every matrix.
        bit_options: the code widths target_bytes chooses from.
        group_options: the group sizes it chooses from (0 = per-channel; one that does not divide a
            matrix's in_features is not offered to it); empty = `group_size` alone.
        correction_ranks: the correction ranks it chooses from (0 = none).
        embedding_bit_options: with target_bytes, the input embedding's (and its lm_head's) code
            widths to choose from, priced by the head's output error; empty = as `embedding_bits`
            says (counted in the bytes either way).
        embedding_gptq: with `embedding_bits` and a tied lm_head, quantize the shared table by GPTQ
            against the Hessian of lm_head's input (the final-norm hidden states of the calibration
            windows, after the blocks are quantized) instead of rounding it to nearest first.
    """

    act_order: bool = False
    dampening: float = 0.01
    block_size: int = 128
    correction_rank: int = 0
    target_bytes: float = 0.0
    bit_options: tuple[int, ...] = (2, 3, 4, 8)
    group_options: tuple[int, ...] = ()
    correction_ranks: tuple[int, ...] = (0,)
    embedding_bit_options: tuple[int, ...] = ()
    embedding_gptq: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dampening, bool) or not 0 <= self.dampening < 10:
            raise ConfigError(f"gptq: `dampening` is a fraction of the mean Hessian diagonal and must be in "
                              f"[0, 10), got {self.dampening!r}; the paper uses 0.01")
        for key in ("block_size", "correction_rank"):
            value, low = getattr(self, key), 1 if key == "block_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"gptq: `{key}` must be an integer >= {low}, got {value!r}")
        self._check_budget_fields()

    def _check_budget_fields(self) -> None:
        if isinstance(self.target_bytes, bool) or not 0 <= self.target_bytes <= 1:
            raise ConfigError(f"gptq: `target_bytes` is a fraction of the dense bf16 checkpoint's bytes in (0, 1] "
                              f"(0 = off), got {self.target_bytes!r}; e.g. `--target-bytes 0.3`")
        for key in ("bit_options", "embedding_bit_options"):
            widths = getattr(self, key)
            if (key == "bit_options" and not widths) or any(b not in INT_BITS for b in widths):
                raise ConfigError(f"gptq: `{key}` must list widths among {', '.join(map(str, INT_BITS))}, got "
                                  f"{list(widths)}")
        if self.embedding_bit_options and not self.target_bytes:
            raise ConfigError("gptq: `embedding_bit_options` is what `target_bytes` chooses from; set `target_bytes`, "
                              "or give the embedding one width with `embedding_bits`")
        for key in ("group_options", "correction_ranks"):
            if any(isinstance(v, bool) or v < 0 for v in getattr(self, key)):
                raise ConfigError(f"gptq: `{key}` must list integers >= 0, got {list(getattr(self, key))}")
        if self.target_bytes and self.correction_rank:
            raise ConfigError("gptq: with `target_bytes` the correction ranks are chosen from `correction_ranks`; "
                              "drop `correction_rank` and list the ranks to choose from, e.g. `correction_ranks: [0, 16]`")

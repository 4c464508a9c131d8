"""gptq: weight-only quantization with second-order error feedback (Frantar et al., "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers", arXiv 2210.17323).

Its config (see compressor/configs/__init__.py); the method is compressor/methods/gptq.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CalibrationConfig
from ..errors import ConfigError
from .quant import QuantFields


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
        embedding_gptq: with `embedding_bits` and a tied lm_head, quantize the shared table by GPTQ
            against the Hessian of lm_head's input (the final-norm hidden states of the calibration
            windows, after the blocks are quantized) instead of rounding it to nearest first.
    """

    act_order: bool = False
    dampening: float = 0.01
    block_size: int = 128
    correction_rank: int = 0
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

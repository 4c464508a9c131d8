"""The fields both weight-only quantizers share (rtn, gptq): code width, group size, symmetry. A
base: it declares no method (the integer grid itself is compressor/methods/_quant_grid.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from ..errors import ConfigError

# The code widths compressor.kernels.packing packs (its INT_BITS; tests/test_registry_table.py checks
# they agree): the kernels import nothing from the library, and this module imports no torch.
INT_BITS = (2, 3, 4, 8)


@dataclass(frozen=True, kw_only=True)
class QuantFields(MethodConfig):
    """Args:
    bits: code width, one of 2, 3, 4, 8.
    group_size: consecutive input columns sharing one scale (and zero point); it must divide
        every targeted layer's in_features; 0 = per-channel (one group per output row).
    symmetric: symmetric grid (no zero point; llm-compressor's W4A16) or asymmetric (a uint8 zero
        point per group).
    embedding_bits: 0 leaves the input embedding as it is; 2, 3, 4 or 8 rounds it to nearest on
        that grid (groups along the hidden dimension). A tied lm_head then computes with the same
        packed codes; an untied one is quantized as a linear on the same grid.
    embedding_group_size: the embedding's group size (a divisor of the hidden size, 0 =
        per-row); None = `group_size`.
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    embedding_bits: int = 0
    embedding_group_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.method_name or "quantize"
        if isinstance(self.bits, bool) or self.bits not in INT_BITS:
            raise ConfigError(f"{name}: `bits` must be one of {', '.join(map(str, INT_BITS))}, got "
                              f"{self.bits!r}; e.g. `--bits 4`")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"{name}: `group_size` must be a positive integer dividing in_features, or 0 "
                              f"for per-channel, got {self.group_size!r}")
        if isinstance(self.embedding_bits, bool) or self.embedding_bits not in (0, *INT_BITS):
            raise ConfigError(f"{name}: `embedding_bits` must be 0 (embedding left as is) or one of "
                              f"{', '.join(map(str, INT_BITS))}, got {self.embedding_bits!r}; e.g. `embedding_bits: 8`")
        group = self.embedding_group_size
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
            raise ConfigError(f"{name}: `embedding_group_size` must be a positive integer dividing the hidden "
                              f"size, 0 for one group per row, or omitted (= group_size), got {group!r}")

"""Checkpoint dtypes: names users write, and the dtype a source model declares.

A run computes in float32 (calibration statistics in float32/float64 as before) and writes its
checkpoint in the *output dtype*: `dtype: auto` (the default) is the source model's own dtype,
as its config declares it (`dtype`, or the older `torch_dtype`), or, for a GGUF file, the
precision its header names (F32 -> float32, F16 -> float16, BF16 and quantized types -> bfloat16:
quantized GGUF weights dequantize to at most 16 significant bits). A source that declares
nothing is float32.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
AUTO = "auto"
# general.file_type of a GGUF header (llama.cpp's LlamaFileType): 0 = all F32, 1 = mostly F16.
GGUF_FILE_TYPES = {0: torch.float32, 1: torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {sorted(DTYPES)} or `auto` (the source model's), "
                          f"got {name!r}")
    return DTYPES[name]


def check_output_dtype(name: Any) -> None:
    """ConfigError unless `name` is `auto` or a known dtype name (checked before any loading)."""
    if name != AUTO:
        parse_dtype(name if isinstance(name, str) else str(name))


def output_dtype(name: str | None, source: torch.dtype) -> torch.dtype:
    """The dtype a checkpoint is written in: `auto`/None = the source model's."""
    if name in (None, AUTO) and source not in DTYPES.values():
        raise ConfigError(f"`dtype: auto` means the source model's dtype, and its config.json declares "
                          f"{dtype_name(source)}, which is not a float dtype; pass --dtype float32, bfloat16 or "
                          "float16 (recipes: `dtype:`)")
    return source if name in (None, AUTO) else parse_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def declared_dtype(config) -> torch.dtype:
    """The dtype a transformers config declares (`dtype` / `torch_dtype`); float32 if none."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value in DTYPES:
            return DTYPES[value]
    return torch.float32


def gguf_dtype(path: str | Path) -> torch.dtype:
    """The precision a GGUF file's header declares (`general.file_type`); see the module doc."""
    file_type = _gguf_file_type(Path(path))
    if file_type is None:
        return torch.bfloat16
    return GGUF_FILE_TYPES.get(file_type, torch.bfloat16)


# GGUF metadata value types (gguf spec): scalar sizes; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_file_type(path: Path) -> int | None:
    """Scan the header's key/value pairs for general.file_type without reading any tensor."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            return None
        _version, _tensors, kv_count = struct.unpack("<IQQ", f.read(20))
        for _ in range(kv_count):
            key = f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8", "replace")
            kind = struct.unpack("<I", f.read(4))[0]
            if key == "general.file_type" and kind in _SCALARS:
                fmt = "<" + _SCALARS[kind]
                return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])
            _skip_value(f, kind)
    return None


def _skip_value(f, kind: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[kind]), 1)
    elif kind == 8:
        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
    elif kind == 9:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _SCALARS:
            f.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")

"""Model size before and after a run: parameters, in-memory bytes, on-disk bytes, ratios.

Pure bookkeeping over tensors and files; the pipeline calls it and stores the result in
`Report.size`. Tensors shared in memory (tied embeddings) count once; floating tensors are counted
at the checkpoint dtype, integer buffers (packed sparse indices) at their own size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin", "*.gguf")


def model_size(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """{parameters, memory_bytes} of `model` held in `dtype` (unique tensors, persistent only)."""
    persistent = set(model.state_dict(keep_vars=True))
    seen: set[int] = set()
    params = memory = 0
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in seen or name not in persistent:
            continue
        seen.add(id(tensor))
        size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        memory += tensor.numel() * size
        params += tensor.numel() if isinstance(tensor, nn.Parameter) else 0
    return {"parameters": params, "memory_bytes": memory}


def weight_file_bytes(path: str | Path) -> int | None:
    """Bytes of a model's weight files: a .gguf file, or a folder's model shards (None if none)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    files = {f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)}
    return sum(f.stat().st_size for f in files) if files else None


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())


def size_summary(before: dict[str, Any], after: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Before/after figures plus after/before ratios for every figure both sides have."""
    ratio = {key: after[key] / before[key] for key in before
             if isinstance(before.get(key), int) and before[key] and isinstance(after.get(key), int)}
    return {"dtype": str(dtype).removeprefix("torch."), "before": before, "after": after, "ratio": ratio}


def size_table(size: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the report: one per figure, before / after / ratio."""
    labels = {"parameters": "parameters", "memory_bytes": "in-memory bytes", "disk_bytes": "on-disk bytes"}
    return [{"figure": label, "before": size["before"].get(key, "n/a"), "after": size["after"].get(key, "n/a"),
             "ratio": size["ratio"].get(key, "n/a")} for key, label in labels.items()]

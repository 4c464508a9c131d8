"""`compressor export DIR --format compressed-tensors --out OUT`: a standard format for serving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, handle_errors


@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a compressor checkpoint folder (e.g. `compress -m prune` output)")],
    format_: Annotated[str, typer.Option("--format", help="compressed-tensors (2:4 pruned models, vLLM's format)")]
    = "compressed-tensors",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (written atomically)")] = None,
) -> None:
    """Write a compressed checkpoint in a standard format (2:4 prune -> compressed-tensors sparse-24-bitmask)."""
    from compressor.export import export as run_export

    out = out or checkpoint.with_name(f"{checkpoint.name}-{format_}")
    run_export(checkpoint, format_, out)
    console.print(f"wrote {out} ({format_})")

"""`compressor export DIR --format compressed-tensors --out OUT`: a standard format for serving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, handle_errors


CHECKPOINT_HELP = "a compressor checkpoint folder (2:4 `compress -m prune`, int4/int8 `-m gptq` / `-m rtn`)"
FORMAT_HELP = ("compressed-tensors (vLLM's format: pack-quantized int4/int8, or sparse-24-bitmask 2:4); "
               "bitsandbytes is refused with the reason")


@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_HELP)],
    format_: Annotated[str, typer.Option("--format", help=FORMAT_HELP)]
    = "compressed-tensors",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (written atomically)")] = None,
) -> None:
    """Write a compressed checkpoint in a standard format (compressed-tensors: int4/int8 ->
    pack-quantized, 2:4 prune -> sparse-24-bitmask)."""
    from compressor.export import export as run_export

    out = out or checkpoint.with_name(f"{checkpoint.name}-{format_}")
    run_export(checkpoint, format_, out)
    console.print(f"wrote {out} ({format_})")

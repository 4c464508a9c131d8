"""`compressor methods [NAME]`: what is registered, with fields and defaults (read from the code)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from compressor.registry import get_method, method_names

from .common import console, handle_errors


@handle_errors
def methods(name: Annotated[str | None, typer.Argument(help="show one method's fields")] = None) -> None:
    """List registered methods, or one method's config fields and defaults."""
    if name is None:
        table = Table(title="registered methods", title_justify="left")
        for column in ("method", "kind", "summary"):
            table.add_column(column)
        for method_name in method_names():
            method = get_method(method_name)
            table.add_row(method_name, method.kind, method.summary)
        console.print(table)
        return
    method = get_method(name)
    console.print(f"[bold]{method.name}[/] ({method.kind}) — {method.summary}")
    table = Table(show_header=True)
    for column in ("field", "default"):
        table.add_column(column)
    for field in dataclasses.fields(method.config_cls):
        default = field.default if field.default is not dataclasses.MISSING else "(required)"
        table.add_row(field.name, repr(default))
    console.print(table)
    console.print(method.config_cls.__doc__ or "")

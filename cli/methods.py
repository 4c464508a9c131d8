"""`compressor methods [NAME]`: what is registered, with fields, defaults and descriptions.

Answers without importing any method module (and so without torch): names, kinds and summaries
come from `registry.BUILTIN`, fields from the config classes' source (`compressor.config_docs`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import console, handle_errors


@handle_errors
def methods(name: Annotated[str | None, typer.Argument(
        help="show one method's config fields with defaults and descriptions", show_default=False)] = None) -> None:
    """List the registered methods, or one method's config fields (recipe keys / --set names) and defaults."""
    from rich.markup import escape
    from rich.table import Table

    from compressor.registry import method_info, method_names

    if name is None:
        table = Table(title="methods (`compressor methods NAME` for fields)", title_justify="left")
        for column in ("method", "kind", "summary"):
            table.add_column(column, no_wrap=column != "summary", overflow="fold")
        for method_name in method_names():
            info = method_info(method_name)
            table.add_row(method_name, info.kind, escape(info.summary))
        console.print(table)
        return
    info = method_info(name)
    console.print(f"[bold]{name}[/] ({info.kind}) — {escape(info.summary)}", highlight=False)
    table = Table(title=f"fields of {info.config_class} (recipe keys; `--set KEY=VALUE` on the CLI)",
                  title_justify="left")
    for column in ("field", "default", "description"):
        table.add_column(column, overflow="fold", no_wrap=column == "field")
    for field in _fields(name, info):
        table.add_row(field.name, escape(field.default), escape(field.description))
    console.print(table, highlight=False)


def _fields(name: str, info):
    """Statically read fields for built-ins; an imported user method's dataclass otherwise."""
    from compressor.config_docs import FieldDoc, args_section, config_fields

    try:
        return config_fields(info.module, info.config_class)
    except (LookupError, OSError, SyntaxError):
        import dataclasses

        from compressor.registry import get_method

        config_cls = get_method(name).config_cls
        docs = {}
        for klass in reversed(config_cls.__mro__):
            docs.update(args_section(klass.__doc__ or ""))
        return [FieldDoc(f.name, json.dumps(f.default, default=str) if f.default is not dataclasses.MISSING
                         else "(required)", docs.get(f.name, "")) for f in dataclasses.fields(config_cls)]

"""`compressor methods [NAME]`: what is registered, with fields, defaults and descriptions.

Answers without importing any method module (and so without torch): names, kinds, summaries and
fields come from the config dataclasses, which are declared in torch-free modules
(compressor/configs/, `registry.BUILTIN`). Output is plain wrapped text (no rich): this command is
about answering at once.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Annotated

import typer

from .common import handle_errors


@handle_errors
def methods(name: Annotated[str | None, typer.Argument(
        help="show one method's config fields with defaults and descriptions", show_default=False)] = None) -> None:
    """List the registered methods, or one method's config fields (recipe keys / --set names) and defaults."""
    from compressor.config import field_docs
    from compressor.registry import method_info, method_names

    if name is None:
        names = method_names()
        rows = [(n, method_info(n).kind, method_info(n).summary) for n in names]
        typer.echo("methods (`compressor methods NAME` lists a method's fields)\n")
        typer.echo(columns([("method", "kind", "summary"), *rows]))
        return
    info = method_info(name)
    typer.echo(f"{name} ({info.kind}): {info.summary}\n")
    typer.echo(f"fields of {info.config_class} (recipe keys; `--set KEY=VALUE` on the command line):\n")
    typer.echo(columns([("field", "default", "description"),
                        *[(f.name, f.default, f.description) for f in field_docs(info.config_cls)]]))


def columns(rows: list[tuple[str, str, str]]) -> str:
    """Two aligned columns and a third wrapped to the terminal width, never cut."""
    width = max(shutil.get_terminal_size((120, 24)).columns, 80)
    first = max(len(r[0]) for r in rows)
    second = max((len(r[1]) for r in rows if len(r[1]) <= 24), default=8)
    indent = first + second + 4
    lines = []
    for a, b, c in rows:
        head = f"{a:<{first}}  {b:<{second}}  "
        if len(b) > second:  # a long default gets its own line
            lines.append(f"{a:<{first}}  {b}")
            head = " " * indent
        wrapped = textwrap.wrap(c, width=max(width - indent, 30)) or [""]
        lines.append(head + wrapped[0])
        lines.extend(" " * indent + more for more in wrapped[1:])
    return "\n".join(lines)


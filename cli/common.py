"""Shared CLI plumbing: one-line errors with exit codes, common options, result printing."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from compressor.errors import ConfigError

from .failures import debug_enabled, explain, unexpected

# Piped output (CI logs, files) gets wide tables instead of 80-column wrapping of module names.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 400)

ModelArg = Annotated[str | None, typer.Argument(help="HF id, local folder, .gguf file or compressor checkpoint "
                                                     "(default: the embedded stories260K)", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="output folder (written atomically)")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace --out when it holds an earlier result of "
                                                                "this tool (other folders are never touched)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a field: key=value (repeatable)")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:0, ...")]
SeedOpt = Annotated[int, typer.Option(help="seed for data sampling and training")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow a Hub model's custom code")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    help="offload with accelerate (model bigger than the device): per-device budget, e.g. "
         "'0=20GiB,cpu=60GiB'; the rest goes to --offload-folder")]
OffloadFolderOpt = Annotated[str | None, typer.Option(
    help="folder for offloaded weights that fit in no --max-memory budget")]


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit with `code` — no traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Every failure as one line on stderr (cli/failures.py): known classes exit with their code
    (2 = bad input, 3 = gate missed, 130 = interrupted), unexpected ones exit 1 and point to
    `--debug`, which shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException, SystemExit):
            raise
        except BaseException as err:
            report_failure(err)

    return wrapper


def report_failure(err: BaseException) -> None:
    """Print `err` as one line and exit (re-raise under --debug)."""
    if debug_enabled():
        raise err
    known = explain(err)
    if known is None:
        fail(unexpected(err), 1)
    code, message = known
    fail(message, code)


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def print_evaluation(evaluation: dict[str, dict[str, Any]]) -> None:
    if not evaluation:
        return
    table = Table(title="quality (held-out text)", title_justify="left")
    keys = sorted({k for v in evaluation.values() for k in v})
    table.add_column("when")
    for key in keys:
        table.add_column(key, justify="right")
    for when, values in evaluation.items():
        table.add_row(when, *[f"{values[k]:.4g}" if isinstance(values.get(k), float) else str(values.get(k, ""))
                              for k in keys])
    console.print(table)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def stage_fields(method: str, flags: dict[str, object],
                 aliases: dict[str, tuple[str, ...]] | None = None) -> dict[str, object]:
    """Map CLI flags onto the method's config fields; a flag the method lacks is an error.

    `aliases` maps a flag to the field names it may fill, first match wins (e.g. `--calib` fills
    `calibration` or `calib_data`); other flags fill the field of the same name."""
    from compressor.registry import get_method

    fields = get_method(method).config_cls.field_names()
    chosen = {}
    for flag, value in flags.items():
        if value is None:
            continue
        candidates = (aliases or {}).get(flag, (flag.replace("-", "_"),))
        key = next((f for f in candidates if f in fields), None)
        if key is None:
            raise ConfigError(f"`--{flag}` does not apply to method `{method}` (its fields: {', '.join(fields)}); "
                              "use --set key=value for method-specific fields")
        chosen[key] = value
    return chosen

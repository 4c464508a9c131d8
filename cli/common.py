"""Shared CLI plumbing: one-line errors with exit codes, common options, result printing.

Imports here stay light (typer, rich, compressor.errors): every `--help` loads this module, and
torch / transformers are imported only inside the commands that run a model.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from compressor.errors import ConfigError
from compressor.protocol import PROTOCOL

from .failures import debug_enabled, explain, unexpected


class LazyConsole:
    """A rich Console made on first use: importing rich.console costs more than typer's own
    `--help`, and help or `--version` never print through it."""

    def __init__(self, stderr: bool, piped_width: int):
        self._settings = {"stderr": stderr, "width": None if (sys.stderr if stderr else sys.stdout).isatty()
                          else piped_width}
        self._console = None

    def __getattr__(self, name: str):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._settings)
        return getattr(self._console, name)


# Piped output (CI logs, files) gets wide tables instead of 80-column wrapping of module names.
console = LazyConsole(stderr=False, piped_width=200)
err_console = LazyConsole(stderr=True, piped_width=400)

DATA_HELP = ("`default` (the embedded TinyStories excerpt), a .txt/.jsonl/.json/.csv/.tsv/.parquet file, or a "
             "Hugging Face datasets name `name[:config[:split]]` (e.g. `wikitext:wikitext-2-raw-v1:test`)")

ModelArg = Annotated[str | None, typer.Argument(help="HF id, local folder, .gguf file or compressor checkpoint "
                                                     "[default: the embedded stories260K]", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="output folder (written atomically; nothing is "
                                                                  "written without it)", show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", show_default=False,
                                            help="replace --out when it holds an earlier result of this tool "
                                                 "(other folders are never touched)")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", show_default=False, metavar="KEY=VALUE",
    help="override any recipe or stage field, repeatable: `--set dtype=bfloat16` (top level), "
         "`--set stages.0.rank=0.4` or `--set rank=0.4` (the stage's field; see `compressor methods NAME`)")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available, else CPU), cpu, cuda, cuda:0, ...")]
SeedOpt = Annotated[int, typer.Option(help="seed for data sampling and training")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or progress lines",
                                        show_default=False)]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow a Hub model's custom code",
                                        show_default=False)]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    show_default=False,
    help="offload with accelerate (model bigger than the device): per-device budget, e.g. "
         "'0=20GiB,cpu=60GiB'; the rest goes to --offload-folder [default: no offloading]")]
DtypeOpt = Annotated[str | None, typer.Option(
    show_default=False,
    help="dtype of the written checkpoint: auto (the source model's), float32, bfloat16, float16 [default: auto]")]
OffloadFolderOpt = Annotated[str | None, typer.Option(
    show_default=False, help="folder for offloaded weights that fit in no --max-memory budget [default: none]")]
EvalDataOpt = Annotated[str, typer.Option(help=f"held-out text for quality before/after: {DATA_HELP}; its second "
                                               "half is scored")]
TextColumnOpt = Annotated[str | None, typer.Option(
    show_default=False, help="column holding the text in .jsonl/.json/.csv/.tsv/.parquet or datasets input "
                             "[default: the first of text, sentence, content, document]")]
EvalWindowsOpt = Annotated[int, typer.Option(
    help=f"held-out windows of {PROTOCOL['seq_len']} tokens scored before and after (the first ones of the held-out half, the "
         "same windows `compressor eval` scores)")]


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
            check_kernels_env()
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException, SystemExit):
            raise
        except BaseException as err:
            report_failure(err)

    return wrapper


KERNEL_CHOICES = ("ref", "triton", "auto")


def check_kernels_env() -> None:
    """COMPRESSOR_KERNELS (read by compressor.kernels on every compressed layer's call) checked
    once, before any work: a typo, or `triton` where Triton cannot run, is one line up front."""
    import os

    raw = os.environ.get("COMPRESSOR_KERNELS")
    value = (raw or "").strip().lower()
    if value in ("", "auto", "ref"):
        return
    if value not in KERNEL_CHOICES:
        raise ConfigError(f"COMPRESSOR_KERNELS is {raw!r}; set it to one of {', '.join(KERNEL_CHOICES)} (auto: "
                          "Triton on CUDA, else the pure-torch reference), or unset it")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    import importlib.util

    import torch

    if importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or interpreting):
        raise ConfigError("COMPRESSOR_KERNELS=triton needs the triton package and a CUDA GPU, and this machine "
                          "lacks one; set COMPRESSOR_KERNELS=auto (Triton where it can run) or ref")


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
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)




def stage_fields(method: str, kind: str, flags: dict[str, object]) -> dict[str, object]:
    """The stage fields `flags` fill (registry.FLAG_FIELDS), after checking `method` is a `kind`
    method: a compression method given to `finetune` names the command that runs it."""
    from compressor.registry import fields_from_flags, method_info, method_names

    info = method_info(method)  # unknown names get the did-you-mean error
    if info.kind != kind:
        word = {"compress": "compression", "finetune": "fine-tuning"}.get(kind, kind)
        raise ConfigError(f"`--method {method}` is not a {word} method; use `compressor {info.kind} --method "
                          f"{method}` ({word} methods: {', '.join(method_names(kind))})")
    return fields_from_flags(method, flags)


def method_help(kind: str) -> str:
    """`--method` help listing the methods of `kind` (read from their configs, no torch)."""
    from compressor.registry import method_names

    return f"{', '.join(method_names(kind))} (see `compressor methods`)"

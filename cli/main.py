"""The `compressor` console script: builds the Typer app, nothing else.

Every command module imports only typer, rich and light compressor modules at the top; torch,
transformers and peft load inside the commands that run a model, and `main` imports only the module
of the command it runs, so `--help`, `--version` and `compressor methods` answer at once
(benchmarks/cli_latency.py measures it).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings
from typing import Annotated

import click
import typer

from .common import report_failure
from .failures import DEBUG_ENV
from .outcome import SHOWN_WARNINGS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HELP = ("Analyse, compress and fine-tune transformer checkpoints. Run `compressor COMMAND --help`; "
        "MODEL defaults to the embedded stories260K everywhere. Add --debug anywhere to see the traceback of a failure.")

# name -> (module in compressor.cli, function, short help). The console script imports only the
# module of the command it runs (`main`), so `--help` / `--version` import no command and
# `compress --help` only compress's (whose `--method` help reads every config class).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "analyze": ("analyze", "analyze", "spectra, κ, effective rank, WeLore ranks of every linear"),
    "compress": ("compress", "compress", "compress the linears (low rank, dense×sparse, pruning, quantization) and write a checkpoint"),
    "finetune": ("finetune", "finetune", "fine-tune (LoRA, NOLA, DSEE, KappaTune, MeZO, Sorted, backprop)"),
    "eval": ("eval", "eval_command", "held-out perplexity of a causal LM, and lm-eval task scores"),
    "compare": ("compare", "compare", "checkpoints of one model side by side: bytes, perplexity, tasks, speed"),
    "run": ("run", "run", "run a YAML recipe (stages, evaluation, quality gates)"),
    "methods": ("methods", "methods", "list methods, or one method's fields and defaults"),
    "generate": ("generate", "generate", "continue a prompt, to eyeball a model"),
    "export": ("export", "export", "write a checkpoint in a standard format (compressed-tensors)"),
}


def build_app(only: str | None = None) -> typer.Typer:
    """The Typer app with every command; with `only`, the other commands are listed (name and
    short help) but their modules are not imported — they cannot be the one that runs."""
    app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode=None, help=HELP)  # plain click help: no box drawing, no rich import
    for name, (module, function, short_help) in COMMANDS.items():
        if only is None or name == only:
            command = getattr(importlib.import_module(f"{__package__}.{module}"), function)
        else:
            command = _not_loaded
        app.command(name, short_help=short_help)(command)
    app.callback()(_root)
    return app


def _not_loaded() -> None:
    raise RuntimeError("a command main() did not load ran")  # unreachable: main loads the command it runs


def command_in(argv: list[str]) -> str:
    """The command a command line runs ('' for `--help`, `--version` or none): its first
    argument that is not an option (the top level takes no option with a value)."""
    first = next((arg for arg in argv if not arg.startswith("-")), "")
    return first if first in COMMANDS or not first else ""


def _print_version(value: bool) -> None:
    if value:
        from compressor import __version__

        typer.echo(f"compressor {__version__}")
        raise typer.Exit()


def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                show_default=False, help="print the version and exit")] = False):
    """Analyse, compress and fine-tune transformer checkpoints. Run `compressor COMMAND --help`;
    MODEL defaults to the embedded stories260K everywhere."""
    plain_warnings()


def plain_warnings() -> None:
    """Python warnings as one plain `warning:` line each, once per message (no source line);
    libraries' deprecation notices, which a CLI user cannot act on, are not shown."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.showwarning = show_warning
    # bitsandbytes (imported by peft when installed) logs on CPU that Hugging Face's optional
    # `kernels` package or its CPU kernel is missing; it changes nothing for us.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message)
    if text not in SHOWN_WARNINGS:
        SHOWN_WARNINGS.add(text)
        print(f"warning: {text}", file=sys.stderr, flush=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # `kill` / a job scheduler's SIGTERM stops a run exactly like Ctrl-C: training checkpoints
    # are kept, staging folders removed, and the command exits 130 with one line.
    signal.signal(signal.SIGTERM, _interrupt)
    if "--debug" in sys.argv[1:]:  # global: anywhere on the line; shows tracebacks
        sys.argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        build_app(command_in(sys.argv[1:]))()
    except (SystemExit, click.exceptions.ClickException):
        raise
    except BaseException as err:  # what escaped a command's own handler (e.g. during imports)
        try:
            report_failure(err)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)


def __getattr__(name: str) -> typer.Typer:
    """`compressor.cli.main.app`: the app with every command loaded (tests, `python -m`)."""
    if name != "app":
        raise AttributeError(name)
    global app
    app = build_app()
    return app


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()

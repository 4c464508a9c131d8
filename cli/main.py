"""The `compressor` console script: builds the Typer app, nothing else.

Every command module imports only typer, rich and light compressor modules at the top; torch,
transformers and peft load inside the commands that run a model, so `--help`, `--version` and
`compressor methods` answer at once (benchmarks/cli_latency.py measures it).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Annotated

import click
import typer

from . import analyze, compare, compress, eval, export, finetune, generate, methods, run
from .common import report_failure
from .failures import DEBUG_ENV

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Plain (click) help: no box drawing, flags without a `<bool>` type, and no rich import for --help.
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Analyse, compress and fine-tune transformer checkpoints. Run `compressor COMMAND --help`; "
                       "MODEL defaults to the embedded stories260K everywhere. Add --debug anywhere to see the traceback of a failure.")
app.command("analyze", short_help="spectra, κ, effective rank, WeLore ranks of every linear")(analyze.analyze)
app.command("compress", short_help="compress the linears (low rank, dense×sparse, pruning) and write a checkpoint")(compress.compress)
app.command("finetune", short_help="fine-tune (LoRA, NOLA, DSEE, KappaTune, MeZO, Sorted, backprop)")(finetune.finetune)
app.command("eval", short_help="held-out perplexity of a causal LM, and lm-eval task scores")(eval.eval_command)
app.command("compare", short_help="checkpoints of one model side by side: bytes, perplexity, tasks, speed")(compare.compare)
app.command("run", short_help="run a YAML recipe (stages, evaluation, quality gates)")(run.run)
app.command("methods", short_help="list methods, or one method's fields and defaults")(methods.methods)
app.command("generate", short_help="continue a prompt, to eyeball a model")(generate.generate)
app.command("export", short_help="write a checkpoint in a standard format (compressed-tensors)")(export.export)


def _print_version(value: bool) -> None:
    if value:
        from compressor import __version__

        typer.echo(f"compressor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                show_default=False, help="print the version and exit")] = False):
    """Analyse, compress and fine-tune transformer checkpoints. Run `compressor COMMAND --help`;
    MODEL defaults to the embedded stories260K everywhere."""


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # bitsandbytes (imported by peft when installed) warns on CPU that Hugging Face's optional
    # `kernels` package is missing; it changes nothing for us, so keep it off the CLI's output.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # `kill` / a job scheduler's SIGTERM stops a run exactly like Ctrl-C: training checkpoints
    # are kept, staging folders removed, and the command exits 130 with one line.
    signal.signal(signal.SIGTERM, _interrupt)
    if "--debug" in sys.argv[1:]:  # global: anywhere on the line; shows tracebacks
        sys.argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        app()
    except (SystemExit, click.exceptions.ClickException):
        raise
    except BaseException as err:  # what escaped a command's own handler (e.g. during imports)
        try:
            report_failure(err)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()

"""The `compressor` console script: builds the Typer app, nothing else."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click
import typer

# bitsandbytes (imported by peft when installed) warns on CPU that Hugging Face's optional
# `kernels` package is missing; it changes nothing for us, so keep it off the CLI's output.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from . import analyze, compress, eval, finetune, generate, methods, run  # noqa: E402
from .common import report_failure  # noqa: E402
from .failures import DEBUG_ENV  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Analyse, compress and fine-tune transformer checkpoints. Run `compressor COMMAND --help`. "
                       "Add --debug anywhere to see the traceback of a failure.")
app.command("analyze")(analyze.analyze)
app.command("compress")(compress.compress)
app.command("finetune")(finetune.finetune)
app.command("eval")(eval.eval_command)
app.command("run")(run.run)
app.command("methods")(methods.methods)
app.command("generate")(generate.generate)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
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

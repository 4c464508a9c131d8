"""`--help`, `--version` and `methods` answer without importing torch, transformers or peft."""

import subprocess
import sys
import tempfile

import pytest

from compressor.cli.main import app

HEAVY = ("torch", "transformers", "peft")
LIGHT_COMMANDS = [["--help"], ["--version"], ["methods"], ["methods", "saes-svd"], ["methods", "lora"],
                  *[[name, "--help"] for name in ("analyze", "compress", "finetune", "eval", "run", "methods",
                                                   "generate")]]
PROBE = """
import sys
from compressor.cli.main import app
try:
    app(sys.argv[1:], prog_name="compressor")
except SystemExit as stop:
    assert not stop.code, stop.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_import_no_torch(argv):
    done = subprocess.run([sys.executable, "-P", "-c", PROBE.format(heavy=HEAVY), *argv],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("HEAVY="), done.stdout[-300:]


def test_help_shows_no_bool_type_and_every_option_has_help():
    from typer.main import get_command

    group = get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"`compressor {name} {param.opts[0]}` has no help"
    done = subprocess.run([sys.executable, "-P", "-m", "compressor.cli.main", "compress", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "<bool>" not in done.stdout and "--set" in done.stdout and "dtype=bfloat16" in done.stdout


def test_methods_name_prints_descriptions_and_defaults():
    done = subprocess.run([sys.executable, "-P", "-m", "compressor.cli.main", "methods", "mezo"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "mezo_eps" in done.stdout and "MeZO perturbation scale epsilon" in done.stdout
    assert "0.001" in done.stdout


LEAN = """
import sys
from compressor.cli import main
sys.argv = ["compressor", *sys.argv[1:]]
try:
    main.main()
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m.startswith("compressor.cli.") and m.split(".")[-1] in main.COMMANDS))
"""


@pytest.mark.parametrize("argv, loaded", [(["--help"], []), (["--version"], []),
                                          (["compress", "--help"], ["compressor.cli.compress"])])
def test_the_console_script_imports_only_the_command_it_runs(argv, loaded):
    """`main` builds the app with the other commands listed but not imported (CLI latency)."""
    done = subprocess.run([sys.executable, "-c", LEAN, *argv], capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == repr(loaded)

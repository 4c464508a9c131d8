"""The README is a contract: every ```bash and ```python block in it runs here, as written.

`compressor ...` commands run in-process through the Typer app (the same code the console script
runs, without paying torch's import once per line), `python -c ...` lines in a subprocess, and
```python blocks with exec(), all in a scratch folder holding the repo's `recipes/`. Two kinds of
line are checked instead of run: `pip install` (the extras and the CPU index it names must exist)
and `pytest -q` (that is this suite). Any other command fails the test: fence text that cannot run
here (a GPU, a big model, a file the reader must bring) as ```text instead.
"""

from __future__ import annotations

import re
import time
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme_blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text(encoding="utf-8"))]


def shell_commands(block: str) -> list[list[str]]:
    """Commands of a bash block: continuation lines joined, comments dropped, `&&` chains split."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def check_pip_install(words: list[str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert words[:2] == ["pip", "install"], words
    for word in words[2:]:
        match = re.fullmatch(r'-e|\.\[(.*)\]|torch==[\d.]+|--index-url|' + re.escape(CPU_INDEX), word)
        assert match, f"README: unexpected pip argument {word!r}"
        if match.group(1):
            assert set(match.group(1).split(",")) <= set(extras), f"README names unknown extras {word}"


def run_command(words: list[str]) -> None:
    if words[:2] == ["pip", "install"]:
        check_pip_install(words)
    elif words == ["pytest", "-q"]:
        pass  # this suite
    elif words[0] == "compressor":
        started = time.perf_counter()
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, f"`{shlex.join(words)}` failed:\n{result.output}"
        print(f"$ {shlex.join(words)}  ({time.perf_counter() - started:.1f} s)\n{result.output[-1500:]}")
    elif words[:2] == ["python", "-c"]:
        done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"`{shlex.join(words)}` failed:\n{done.stderr}"
    else:
        raise AssertionError(f"README runs `{shlex.join(words)}`, which this test cannot run; fence it as text")


def test_readme_has_the_quick_start_commands():
    quick = shell_commands(readme_blocks()[0][1])
    assert quick[0][:2] == ["pip", "install"] and quick[1] == ["compressor", "analyze"] and quick[2] == ["pytest", "-q"]


@pytest.mark.slow
def test_every_readme_block_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks()
    assert len(blocks) >= 6
    for language, text in blocks:
        if language == "python":
            exec(compile(text, "README.md", "exec"), {"__name__": "__readme__"})
        else:
            for words in shell_commands(text):
                run_command(words)
    assert (tmp_path / "runs" / "api-saes" / "model.safetensors").is_file()
    assert "quantization_config" in (tmp_path / "runs" / "in-memory" / "config.json").read_text()

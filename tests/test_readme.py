"""The README is a contract: every ```bash and ```python block in it runs here, as written, both
from the repo root as a user who cloned it would (a folder that links every top-level entry of the
repo, so outputs land in scratch) and from a scratch folder holding only `recipes/`.

`compressor ...` commands run in-process through the Typer app (the same code the console script
runs, without paying torch's import once per line), `python -c ...` lines in a subprocess started in
that folder, and ```python blocks with exec(). Two kinds of line are checked instead of run:
`pip install` (the extras and the CPU index it names must exist) and `pytest -q` (that is this
suite). Any other command fails the test: fence text that cannot run here (a GPU, a big model, a
file the reader must bring) as ```text instead. The commands' output holds no Python warning
(`...Warning`, `file.py:N:` source lines), and the README's recipe snippet is the recipe file.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from compressor.cli.main import app
from typer.testing import CliRunner

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


# Python's own warning format (`file.py:12: UserWarning: ...`) and any `...Warning` class name.
PYTHON_WARNING = re.compile(r"\.py:\d+: |Warning")


def run_command(words: list[str], cwd: Path) -> str:
    """Run one README command in `cwd`; returns what it printed ("" for checked-only lines)."""
    if words[:2] == ["pip", "install"]:
        check_pip_install(words)
    elif words == ["pytest", "-q"]:
        pass  # this suite
    elif words[0] == "compressor":
        started = time.perf_counter()
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, f"`{shlex.join(words)}` failed:\n{result.output}"
        print(f"$ {shlex.join(words)}  ({time.perf_counter() - started:.1f} s)\n{result.output[-1500:]}")
        return result.output
    elif words[:2] == ["python", "-c"]:
        done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=120, cwd=cwd,
                              check=False)
        assert done.returncode == 0, f"`{shlex.join(words)}` failed:\n{done.stderr}"
        return done.stdout + done.stderr
    else:
        raise AssertionError(f"README runs `{shlex.join(words)}`, which this test cannot run; fence it as text")
    return ""


def run_readme(folder: Path) -> None:
    """Every block, in order, from `folder`; no command prints a Python warning."""
    warned = []
    for language, text in readme_blocks():
        if language == "python":
            exec(compile(text, "README.md", "exec"), {"__name__": "__readme__"})
            continue
        for words in shell_commands(text):
            output = run_command(words, folder)
            warned += [f"{shlex.join(words)}: {line}" for line in output.splitlines() if PYTHON_WARNING.search(line)]
    assert not warned, "README commands printed Python warnings:\n" + "\n".join(warned)
    assert (folder / "runs" / "api-saes" / "model.safetensors").is_file()
    assert "quantization_config" in (folder / "runs" / "in-memory" / "config.json").read_text()


def repo_root_view(folder: Path) -> Path:
    """`folder` made to look like the repo root (a link to every top-level entry but `runs/`), so
    commands meet the repo's own folders (`kernels/`, `compressor/`) exactly as in a clone."""
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", ".git"):
            (folder / entry.name).symlink_to(entry)
    return folder


def test_readme_has_the_quick_start_commands():
    quick = shell_commands(readme_blocks()[0][1])
    assert quick[0][:2] == ["pip", "install"] and quick[1] == ["compressor", "analyze"] and quick[2] == ["pytest", "-q"]


def test_the_recipe_snippet_is_the_recipe_file():
    text = README.read_text(encoding="utf-8")
    intro = "`recipes/saes-svd.yaml`, as it is"
    assert intro in text
    snippet = re.search(r"^```yaml\n(.*?)^```", text[text.index(intro):], re.DOTALL | re.MULTILINE).group(1)
    assert snippet == (ROOT / "recipes" / "saes-svd.yaml").read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_readme_block_runs_as_written_from_a_scratch_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    assert len(readme_blocks()) >= 6
    run_readme(tmp_path)


@pytest.mark.slow
def test_every_readme_block_runs_as_written_from_the_repo_root(tmp_path, monkeypatch):
    root = repo_root_view(tmp_path)
    assert (root / "kernels").is_dir() and (root / "pyproject.toml").is_file()
    monkeypatch.chdir(root)
    run_readme(root)

"""Python started in the repo root sees Hugging Face's `kernels`, not our top-level kernels/ folder.

kernels/ has no __init__.py (it is reached as `compressor.kernels` through the compressor/kernels
link), so `python -c`, a REPL or `python -m pytest` run from the repo root can load transformers
models, which import HF's `kernels` package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_top_level_kernels_folder_is_not_a_package():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "compressor" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_python_c_in_repo_root_loads_a_transformers_model():
    code = (
        "import transformers, compressor.kernels.dispatch as d\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained('compressor/assets/stories260K')\n"
        "import kernels\n"
        "assert 'compressor' not in (getattr(kernels, '__file__', None) or ''), kernels\n"
        "print(type(m).__name__, d.__name__)\n"
    )
    done = run_in_root("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["LlamaForCausalLM", "compressor.kernels.dispatch"]


@pytest.mark.slow
def test_python_m_pytest_collects_from_repo_root():
    done = run_in_root("-m", "pytest", "--co", "-q", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " collected" in done.stdout or "tests collected" in done.stdout

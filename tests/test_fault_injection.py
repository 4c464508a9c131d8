"""Fault injection: SIGTERM and SIGKILL at seeded random moments of `compress` and
`finetune --method backprop` on stories260K. Afterwards --out is absent or complete; running the
command again (with --resume for training) reproduces the uninterrupted run bit for bit and
leaves no staging, lock or .partial folder behind.

The CLI runs in forked children of this (already imported) process, so a run costs its work, not
the seconds of importing torch/transformers/peft again. FI_SEED=<anything> picks other moments."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.outdir import MARKER, read_marker

pytestmark = pytest.mark.slow

COMMANDS = {
    "compress": ["compress", "--method", "svd", "--rank", "0.5", "--eval-windows", "1", "-q"],
    "finetune": ["finetune", "--method", "backprop", "--steps", "6", "--lr", "1e-3", "--batch-size", "2",
                 "--seq-len", "32", "--eval-windows", "1", "--set", "num_eval=2", "--set", "checkpoint_every=1", "-q"],
}


def _child(argv: list[str], cwd: str, log: str) -> None:
    from compressor.cli.main import main

    os.chdir(cwd)
    with open(log, "ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
    sys.argv = ["compressor", *argv]
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        code = 99
    os._exit(code)


def start(argv: list[str], cwd: Path) -> multiprocessing.Process:
    process = multiprocessing.get_context("fork").Process(target=_child, args=(argv, str(cwd), str(cwd / "log.txt")))
    process.start()
    return process


def run(argv: list[str], cwd: Path) -> float:
    began = time.perf_counter()
    process = start(argv, cwd)
    process.join(timeout=300)
    assert process.exitcode == 0, (argv, (cwd / "log.txt").read_text()[-2000:])
    return time.perf_counter() - began


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_absent_or_complete(out: Path) -> None:
    if not out.exists():
        return
    marker = read_marker(out)
    assert marker is not None, f"{out} exists without its marker: half-written"
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {MARKER}
    assert present == set(marker["files"]), "published folder differs from its file list"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each command run once, uninterrupted: its weights and wall time."""
    from compressor.registry import method_names
    import compressor.report.plots  # noqa: F401  (imported once here, not in every child)

    method_names()  # imports every method (peft included) before forking
    refs = {}
    for name, argv in COMMANDS.items():
        folder = tmp_path_factory.mktemp(f"ref-{name}")
        seconds = run([*argv, "--out", "out"], folder)
        refs[name] = (weights(folder / "out"), seconds)
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_interrupted_run_is_absent_or_complete_and_reruns_exactly(references, tmp_path, name, signum):
    expected, seconds = references[name]
    rng = random.Random(f"{name}-{int(signum)}{os.environ.get('FI_SEED', '')}")
    argv = [*COMMANDS[name], "--out", "out"]
    victim = start(argv, tmp_path)
    time.sleep(rng.uniform(0.1, 0.9) * seconds)
    if victim.is_alive():
        os.kill(victim.pid, signum)
    victim.join(timeout=120)
    if signum == signal.SIGTERM:
        assert victim.exitcode in (0, 130), (tmp_path / "log.txt").read_text()[-2000:]
        assert not list(tmp_path.glob(".out.tmp-*")), "SIGTERM left a staging folder"
    out = tmp_path / "out"
    assert_absent_or_complete(out)

    progress = list(tmp_path.glob(".out.tmp-*/checkpoints/step-*")) + list(tmp_path.glob("out*/checkpoints/step-*"))
    again = [*argv, *(["--overwrite"] if out.exists() else [])]
    if name == "finetune" and progress:
        again += ["--resume", "out"]
    run(again, tmp_path)
    got = weights(out)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "the rerun differs from the uninterrupted run"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("out", "log.txt"))
    assert leftovers == [], leftovers

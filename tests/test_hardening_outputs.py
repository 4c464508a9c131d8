"""Hardening (issue 22): the tool's sidecar names beside `--out` never cost a user byte, `--out`
inside an input is refused, and an interrupted default `finetune` keeps a resumable OUT.partial
whose resumed run equals an uninterrupted one. Driven from the CLI in fresh temporary folders."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.models import DEFAULT_MODEL_DIR
from compressor.outdir import MARKER, read_marker

runner = CliRunner()
EVAL = ["eval", "--eval-windows", "1", "-q"]


def finetune(steps: int = 6, lr: str = "1e-3", seq_len: int = 32) -> list[str]:
    """A default backprop fine-tune (no checkpoint_every), kept small."""
    return ["finetune", "--method", "backprop", "--steps", str(steps), "--lr", lr, "--batch-size", "2", "--seq-len",
            str(seq_len), "--eval-windows", "1", "--set", "num_eval=2", "-q"]


FINETUNE = finetune()


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256 | 'dir' | 'link -> target'} of everything under `folder`."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            state[rel] = f"link -> {os.readlink(path)}"
        else:
            state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def refused(args, code: int | None, *fragments: str, env=None) -> str:
    """Run the CLI; assert the exit `code` (None: any failure) and one `error:` line naming `fragments`."""
    result = invoke(*args, env=env)
    message = result.stderr.strip()
    assert result.exit_code != 0 and code in (None, result.exit_code), (result.exit_code, message, result.stdout)
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    assert not message.startswith("error: unexpected "), message  # never the catch-all
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- sidecar names ------------------------------------------------------------------------------


def test_a_user_file_named_like_the_lock_is_refused_and_kept(home):
    (home / ".out.lock").write_text("my lock-looking notes\n")
    before = snapshot(home)
    refused([*EVAL, "--out", "out"], 2, ".out.lock", "not a lock this tool wrote")
    assert snapshot(home) == before


def test_a_symlink_named_like_the_lock_is_never_written_through(home):
    (home / "precious.txt").write_text("do not touch\n")
    (home / ".out.lock").symlink_to(home / "precious.txt")
    before = snapshot(home)
    refused([*EVAL, "--out", "out"], 2, ".out.lock")
    assert snapshot(home) == before
    assert (home / "precious.txt").read_text() == "do not touch\n"


def test_a_stale_lock_of_a_killed_run_is_taken_over_and_removed(home):
    (home / ".out.lock").write_text("999999\n")  # what a SIGKILLed run leaves
    assert invoke(*EVAL, "--out", "out").exit_code == 0
    assert (home / "out" / "eval.json").is_file() and not (home / ".out.lock").exists()


def test_a_user_folder_named_like_staging_survives_a_run(home):
    mine = home / ".out.tmp-mine"
    (mine / "checkpoints" / "step-1").mkdir(parents=True)
    (mine / "checkpoints" / "step-1" / "meta.json").write_text('{"mine": true}')
    (mine / "thesis.tex").write_text("chapter 1")
    before = snapshot(mine)
    assert invoke(*EVAL, "--out", "out").exit_code == 0
    assert snapshot(mine) == before
    assert not (home / "out.partial").exists()  # nothing was "salvaged" from the user's folder


def test_failed_folder_holding_user_files_keeps_them_and_the_new_result(home):
    failed = home / "dv.failed"
    failed.mkdir()
    (failed / MARKER).write_text('{"tool": "compressor", "files": ["report.json"]}')
    (failed / "report.json").write_text("{}")
    (failed / "my-analysis.txt").write_text("why it diverged")
    message = refused([*finetune(steps=3, lr="1e4"), "--out", "dv"], 1, "not usable", "dv.failed-")
    assert (failed / "my-analysis.txt").read_text() == "why it diverged"
    kept = Path(message.split("kept for inspection in `")[1].split("`")[0])
    assert kept.parent == home and kept.name.startswith("dv.failed-")
    assert read_marker(kept)["failed"] and (kept / "report.json").is_file()
    assert not (home / "dv").exists()


# -- --out inside an input ------------------------------------------------------------------------


def test_out_inside_the_input_model_is_refused(home):
    shutil.copytree(DEFAULT_MODEL_DIR, home / "m")
    before = snapshot(home)
    refused(["compress", "m", "--method", "svd", "--out", "m/sub", "-q"], 2, "inside the input")
    refused([*EVAL, "m", "--out", "m/eval"], 2, "inside the input")
    assert snapshot(home) == before


def test_export_into_its_own_checkpoint_is_refused(home):
    assert invoke("compress", "--method", "prune", "--eval-windows", "1", "-q", "--out", "pruned").exit_code == 0
    before = snapshot(home)
    refused(["export", "pruned", "--out", "pruned/ct"], 2, "inside the input")
    assert snapshot(home) == before


# -- an interrupted default finetune ------------------------------------------------------------


def _interrupt_at(step: int, how: str):
    """Patch the trainer so that step `step` is interrupted the way `how` says (a real SIGTERM to
    this process, which the CLI's handler turns into KeyboardInterrupt, or Ctrl-C)."""
    from compressor.training import trainer

    original = trainer._accumulate_gradients

    def accumulate(run, model, at):
        if at == step:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return original(run, model, at)

    trainer._accumulate_gradients = accumulate


def _child(argv: list[str], cwd: str, step: int) -> None:
    from compressor.cli.main import main

    os.chdir(cwd)
    _interrupt_at(step, "sigterm")
    sys.stdout = sys.stderr = open(os.path.join(cwd, "log.txt"), "w", buffering=1)  # noqa: SIM115 - until exit
    sys.argv = ["compressor", *argv]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.mark.slow
def test_sigterm_during_a_default_finetune_keeps_resumable_progress_and_user_files(tmp_path, monkeypatch):
    """The real CLI entry point (its SIGTERM handler) in a forked child: SIGTERM at step 4 of 6."""
    reference = tmp_path / "reference"
    reference.mkdir()
    monkeypatch.chdir(reference)
    assert invoke(*FINETUNE, "--out", "ft").exit_code == 0
    work = tmp_path / "work"
    (work / "ft.partial" / "checkpoints").mkdir(parents=True)
    (work / "ft.partial" / "mine.txt").write_text("user notes")
    (work / "ft.partial" / "checkpoints" / "keep.bin").write_bytes(b"\x00user")
    (work / "ft.partial" / MARKER).write_text('{"tool": "compressor", "files": []}')  # an old, empty marker
    user_files = {k: v for k, v in snapshot(work / "ft.partial").items() if k != MARKER}  # the marker is the tool's
    child = multiprocessing.get_context("fork").Process(target=_child, args=(FINETUNE + ["--out", "ft"], str(work), 4))
    child.start()
    child.join(300)
    log = (work / "log.txt").read_text()
    assert child.exitcode == 130, log
    assert "resume" in log and "ft.partial" in log, log
    assert not (work / "ft").exists()
    partial = work / "ft.partial"
    assert sorted(p.name for p in (partial / "checkpoints").iterdir()) == ["keep.bin", "step-4"]
    assert {k: v for k, v in snapshot(partial).items() if k in user_files} == user_files
    monkeypatch.chdir(work)
    result = invoke(*FINETUNE, "--out", "ft", "--resume", "ft")
    assert result.exit_code == 0, result.output
    assert_same_weights(reference / "ft", work / "ft")
    assert (partial / "mine.txt").read_text() == "user notes"  # the superseded progress went, the user's stayed
    assert not (partial / "checkpoints" / "step-4").exists()


def test_ctrl_c_during_a_default_finetune_keeps_progress_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    small = finetune(steps=3, seq_len=16)
    monkeypatch.chdir(tmp_path)
    assert invoke(*small, "--out", "straight").exit_code == 0
    from compressor.training import trainer

    monkeypatch.setattr(trainer, "_accumulate_gradients", trainer._accumulate_gradients)
    _interrupt_at(2, "ctrl-c")
    result = invoke(*small, "--out", "ft")
    assert result.exit_code == 130 and "--resume" in result.stderr, result.output
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    meta = load_file(tmp_path / "ft.partial" / "checkpoints" / "step-2" / "trainable.safetensors")
    assert meta, "the interrupted run's step-2 checkpoint holds its trained tensors"
    assert invoke(*small, "--out", "ft", "--resume", "ft").exit_code == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "ft")
    assert not (tmp_path / "ft.partial").exists()


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(first) == sorted(second)
    for key in first:
        assert first[key].equal(second[key]), key

"""One test per failure class: the exit code, the one-line message, and that nothing the user
owned was touched (every file under the user's folder checksummed before and after)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.outdir import output_lock

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file and {relative path/: 'dir'} of every folder."""
    state = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture
def user(tmp_path, stories_dir, monkeypatch):
    """A user's working folder: a model checkpoint, a text file and a notes file; cwd = it."""
    home = tmp_path / "home"
    shutil.copytree(stories_dir, home / "ckpt")
    (home / "notes.txt").write_text("my notes\n")
    (home / "data.txt").write_text("Once upon a time there was a cat. " * 200)
    monkeypatch.chdir(home)
    return home


def fails(user: Path, args: list[str], code: int, *fragments: str) -> str:
    """Run the CLI in `user`; assert exit `code`, one `error:` line holding `fragments`, no change."""
    before = snapshot(user)
    result = runner.invoke(app, [str(a) for a in args])
    message = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, message, result.stdout)
    assert message.startswith("error: ") and len(message.splitlines()) == 1, message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, message
    assert snapshot(user) == before
    return message


# -- the output folder ----------------------------------------------------------------------


def test_out_is_the_input_model(user):
    fails(user, ["eval", "ckpt", "--out", "ckpt", "-q"], 2, "holds the input", "choose another --out")


def test_out_contains_the_input_model(user):
    fails(user, ["analyze", str(user / "ckpt"), "--out", str(user), "-q"], 2, "current folder or a parent")
    fails(user, ["analyze", "ckpt", "--out", "sub/..", "-q"], 2, "current folder")


def test_out_holds_user_files(user):
    (user / "old").mkdir()
    (user / "old" / "report.json").write_text("{}")  # looks like an output, but the tool did not write it
    fails(user, ["compress", "--method", "svd", "--out", "old", "-q"], 2, "did not write")


def test_previous_output_needs_overwrite(user):
    assert runner.invoke(app, ["eval", "--eval-windows", "1", "--out", "e", "-q"]).exit_code == 0
    fails(user, ["eval", "--eval-windows", "1", "--out", "e", "-q"], 2, "--overwrite")
    (user / "e" / "mine.txt").write_text("mine")
    fails(user, ["eval", "--eval-windows", "1", "--out", "e", "--overwrite", "-q"], 2, "mine.txt")


def test_a_concurrent_run_into_the_same_out(user):
    with output_lock((user / "busy").absolute()):
        fails(user, ["eval", "--out", "busy", "-q"], 2, "another compressor run is writing")


def test_path_too_long(user):
    fails(user, ["eval", "--out", "x" * 300, "-q"], 2, "path is too long")


def test_disk_full_while_writing(user, monkeypatch):
    import compressor.pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")

    monkeypatch.setattr(compressor.pipeline, "save_checkpoint", full)
    fails(user, ["compress", "--method", "svd", "--rank", "0.5", "--eval-windows", "1", "--out", "o", "-q"], 2,
          "no space left")


# -- reading inputs -------------------------------------------------------------------------


def test_truncated_safetensors(user):
    weights = user / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    fails(user, ["eval", "ckpt", "-q"], 2, "truncated or corrupt")


def test_refused_pickle(user):
    import torch

    (user / "ckpt" / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"w": Payload()}, user / "ckpt" / "pytorch_model.bin")
    fails(user, ["eval", "ckpt", "-q"], 2, "refused to unpickle")


def test_invalid_compression_json(user):
    (user / "ckpt" / "compression.json").write_text("{not json")
    fails(user, ["eval", "ckpt", "-q"], 2, "invalid JSON")


@pytest.mark.parametrize("name, content, fragment", [
    ("bad.jsonl", b'{"text": "fine"}\n{broken\n', "not valid JSON"),
    ("latin.txt", "café crème ".encode("latin-1") * 50, "not UTF-8"),
    ("table.parquet", b"PAR1\x15\x04\x15\x00\x00\xff\xfe" * 20, "not valid Parquet"),
])
def test_unreadable_data(user, name, content, fragment):
    (user / name).write_bytes(content)
    fails(user, ["eval", "--data", name, "-q"], 2, fragment)


# -- flags and recipes ------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["eval", "--batch-size", "0"], "`--batch-size` must be an integer >= 1"),
    (["eval", "--seq-len", "4096"], "model's context is 512"),
    (["generate", "--max-new-tokens", "-1"], "`--max-new-tokens` must be an integer >= 0"),
    (["eval", "--device", "cuda:7"], "--device cuda:7"),
    (["eval", "--device", "quantum"], "is not a device"),
    (["compress", "--method", "svd", "--max-memory", "5=1GiB,cpu=1GiB", "--out", "o"], "names GPU 5"),
    (["compress", "--method", "svd", "--set", "rank=123456789012345678901234567890", "--out", "o"], "out of range"),
    (["compress", "--method", "svd", "--set", "method=prune", "--out", "o"], "cannot be overridden"),
    (["finetune", "--method", "lora", "--seq-len", "1000", "--out", "o"], "model's context is 512"),
    (["finetune", "--method", "backprop", "--lr", "inf", "--out", "o"], "`lr` must be > 0 and finite"),
])
def test_numeric_flags_are_checked_before_loading(user, args, fragment):
    fails(user, args, 2, fragment)


def test_deeply_nested_recipe(user):
    (user / "deep.yaml").write_text("stages: " + "[" * 3000 + "]" * 3000 + "\n")
    fails(user, ["run", "deep.yaml", "--dry-run"], 2, "nested more than")


def test_yaml_alias_bomb_fails_fast(user):
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (user / "bomb.yaml").write_text("\n".join(lines) + "\nstages: [*a8]\n")
    assert (user / "bomb.yaml").stat().st_size < 1024
    fails(user, ["run", "bomb.yaml", "--dry-run"], 2, "expands to more than")


# -- results and unexpected failures ------------------------------------------------------------


def test_diverged_finetune_exits_nonzero_and_keeps_result_aside(user):
    args = ["finetune", "--method", "backprop", "--lr", "1e30", "--steps", "3", "--batch-size", "2", "--seq-len",
            "32", "--eval-windows", "1", "--set", "num_eval=2", "--out", "ft", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "not usable" in result.stderr and "ft.failed" in result.stderr
    assert not (user / "ft").exists() and (user / "ft.failed" / "report.json").is_file()


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(user, monkeypatch):
    import compressor.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(compressor.pipeline, "load_model", broken)
    message = fails(user, ["compress", "--method", "svd", "--out", "o", "-q"], 1, "unexpected RuntimeError",
                    "--debug")
    assert "second line" not in message
    monkeypatch.setenv("COMPRESSOR_DEBUG", "1")
    result = runner.invoke(app, ["compress", "--method", "svd", "--out", "o", "-q"])
    assert isinstance(result.exception, RuntimeError)


def test_main_strips_debug_and_handles_sigterm_like_sigint(monkeypatch):
    import signal
    import sys

    from compressor.cli import main as cli_main

    monkeypatch.setattr(sys, "argv", ["compressor", "methods", "--debug"])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as done:
            cli_main.main()
        assert done.value.code in (0, None) and os.environ.get("COMPRESSOR_DEBUG") == "1"
        assert "--debug" not in sys.argv
        assert signal.getsignal(signal.SIGTERM) is cli_main._interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.environ.pop("COMPRESSOR_DEBUG", None)


def test_a_deferred_signal_waits_for_the_block_even_when_another_thread_receives_it():
    """killpg's SIGTERM is process-wide: the kernel may hand it to a thread that does not mask it
    (torch's and gloo's workers), and Python then runs the handler in the main thread at its next
    bytecode. It must still wait for the block (an optimizer step, a publish) to finish. (A
    resumed two-process run once redid a step: the interrupt landed inside the optimizer step.)"""
    import signal
    import threading
    import time

    from compressor.outdir import signals_deferred

    seen: list[str] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("handler"))
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)  # started before the block, so SIGTERM is not masked there
    worker.start()
    try:
        with signals_deferred():
            signal.pthread_kill(worker.ident, signal.SIGTERM)  # what the kernel may do with os.kill
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:  # bytecodes at which a pending handler would run
                pass
            seen.append("block done")
        seen.append("after")
    finally:
        stop.set()
        worker.join()
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["block done", "handler", "after"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_failed_result_marker_is_valid_json(user):
    test_diverged_finetune_exits_nonzero_and_keeps_result_aside(user)
    marker = json.loads((user / "ft.failed" / ".compressor-output.json").read_text())
    assert "loss" in marker["failed"]

"""Multi-process training, proven equal to one process.

Each test starts two CPU processes with `accelerate launch --multi_gpu --num_processes 2`
(torch.distributed.run underneath; our Runtime makes a CPU Accelerator, so DDP runs on gloo) and
compares with one in-process run of the same command at the same *global* batch (2 ranks x 2
windows = 1 process x 4 windows): the loss of every step and the final weights agree to float
tolerance. `accelerate launch --cpu --num_processes 2` is not used: in accelerate 1.x it starts a
single process unless an MPI hostfile is given (the README says so).

Also checked: only rank 0 writes --out (rank 1's scratch folder is removed), an interrupted
two-process run resumes to the uninterrupted result, and MeZO workers that exchange one
(seed, projected gradient) scalar per step reach one worker's weights, which replaying the
logged lines reproduces. FSDP is not exercised (see the README)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from compressor.cli.main import app
from compressor.models import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.slow

COMMON = ["--lr", "1e-3", "--seq-len", "64", "--eval-windows", "1", "--set", "num_eval=2", "--device", "cpu", "-q"]
RANK_BATCH, GLOBAL_BATCH = "2", "4"


def free_port() -> str:
    """A port for the rendezvous: parallel test runs must not share accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", free_port(), "-m", "compressor.cli.main", *args]


def launch_env(cwd: Path) -> dict[str, str]:
    scratch = cwd / "scratch"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1"}


def launch(args: list[str], cwd: Path) -> None:
    """`finetune ...` in two processes; fails the test with the tail of their output."""
    done = subprocess.run(launch_argv(args), cwd=cwd, env=launch_env(cwd), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def single(args: list[str], cwd: Path) -> None:
    """The same command in this process (one rank)."""
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(previous)
    assert result.exit_code == 0, result.output


def losses(out: Path) -> list[float]:
    return json.loads((out / "report.json").read_text())["stages"][0]["curves"]["loss"]


def assert_same_run(two: Path, one: Path, weights: str = "model.safetensors") -> None:
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    a, b = load_file(two / weights), load_file(one / weights)
    assert a.keys() == b.keys()
    # atol 2e-5: two ranks sum gradients in another order; where a gradient is ~0 (LoRA's A after
    # one step from B = 0) Adam's normalisation turns that rounding into steps of up to ~6e-6 (lr 1e-3).
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)


def assert_only_out_written(cwd: Path, out: str = "out2") -> None:
    """Rank 0 published `out`; rank 1 wrote nowhere but its scratch folder, which is gone."""
    assert (cwd / out / ".compressor-output.json").is_file()
    assert sorted(p.name for p in cwd.iterdir() if p.name.startswith(".") or p.name.startswith(out)) == [out]
    assert list((cwd / "scratch").glob("compressor-rank-*")) == []  # torch's own temp folders may stay


def test_backprop_two_processes_equal_one_and_only_rank0_writes(tmp_path):
    args = ["finetune", "--method", "backprop", "--steps", "3", *COMMON]
    launch([*args, "--batch-size", RANK_BATCH, "--out", "out2"], tmp_path)
    single([*args, "--batch-size", GLOBAL_BATCH, "--out", "out1"], tmp_path)
    assert_same_run(tmp_path / "out2", tmp_path / "out1")
    assert_only_out_written(tmp_path)
    moved = load_file(tmp_path / "out2" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    dense = load_file(DEFAULT_MODEL_DIR / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(moved, dense)  # it trained


def test_lora_two_processes_equal_one(tmp_path):
    # dropout 0: each rank draws its own dropout masks, which no single process reproduces
    args = ["finetune", "--method", "lora", "--r", "4", "--steps", "3", *COMMON, "--set", "dropout=0"]
    launch([*args, "--batch-size", RANK_BATCH, "--out", "out2"], tmp_path)
    single([*args, "--batch-size", GLOBAL_BATCH, "--out", "out1"], tmp_path)
    assert_same_run(tmp_path / "out2", tmp_path / "out1", "adapter/adapter_model.safetensors")
    assert_only_out_written(tmp_path)


def test_heal_with_teacher_two_processes_equal_one(tmp_path):
    """heal trains a factored checkpoint's factors, distilling from the dense teacher on each rank."""
    single(["compress", "--method", "svd", "--rank", "0.5", "--eval-windows", "1", "-q", "--out", "svd"], tmp_path)
    args = ["finetune", "--method", "heal", "svd", "--steps", "3", *COMMON, "--set", "loss=kl",
            "--set", f"teacher={DEFAULT_MODEL_DIR}"]
    launch([*args, "--batch-size", RANK_BATCH, "--out", "out2"], tmp_path)
    single([*args, "--batch-size", GLOBAL_BATCH, "--out", "out1"], tmp_path)
    assert_same_run(tmp_path / "out2", tmp_path / "out1")
    assert any(k.endswith(".u") or k.endswith(".v") for k in load_file(tmp_path / "out2" / "model.safetensors"))


def test_mezo_workers_exchanging_projected_gradients_equal_one_worker(tmp_path):
    args = ["finetune", "--method", "mezo", "--steps", "4", "--lr", "1e-3", "--seq-len", "64", "--eval-windows", "1",
            "--set", "num_eval=2", "--device", "cpu", "-q"]
    launch([*args, "--batch-size", RANK_BATCH, "--out", "out2"], tmp_path)
    single([*args, "--batch-size", GLOBAL_BATCH, "--out", "out1"], tmp_path)
    assert_same_run(tmp_path / "out2", tmp_path / "out1")
    lines = [json.loads(line) for line in (tmp_path / "out2" / "mezo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines[1:]] == [0, 1, 2, 3]  # one line per step: what the workers exchanged
    assert set(lines[1]) == {"step", "seed", "projected_grad", "lr", "loss_plus", "loss_minus"}
    # One process replaying those lines (resume, no step left) lands on the two workers' weights.
    single([*args, "--batch-size", RANK_BATCH, "--resume", "out2", "--out", "replayed"], tmp_path)
    replayed, two = load_file(tmp_path / "replayed" / "model.safetensors"), load_file(tmp_path / "out2" / "model.safetensors")
    assert all(torch.equal(replayed[k], two[k]) for k in two)


def test_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["finetune", "--method", "backprop", "--steps", "40", *COMMON, "--set", "checkpoint_every=1",
            "--set", "schedule=constant"]
    victim = subprocess.Popen(launch_argv([*args, "--batch-size", RANK_BATCH, "--out", "out2"]), cwd=tmp_path,
                              env=launch_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out2.tmp-*/checkpoints/step-*")) and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGTERM)  # the launcher and both ranks, like Ctrl-C in a terminal
    victim.wait(timeout=120)
    assert not (tmp_path / "out2").exists(), "the interrupted run published a result"
    launch([*args, "--batch-size", RANK_BATCH, "--out", "out2", "--resume", "out2"], tmp_path)
    resumed_steps = json.loads((tmp_path / "out2" / "report.json").read_text())["stages"][0]["metrics"]["steps"]
    assert 0 < resumed_steps < 40  # it went on from a checkpoint, not from the start
    single([*args, "--batch-size", GLOBAL_BATCH, "--out", "out1"], tmp_path)
    a, b = load_file(tmp_path / "out2" / "model.safetensors"), load_file(tmp_path / "out1" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out2", "out2"))) == ["out2"]

"""benchmarks/kernels_gpu.py --cpu-smoke: the GPU benchmark's checks and plumbing run on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_gpu.py"


@pytest.mark.slow
def test_cpu_smoke_checks_every_kernel_and_writes_the_report(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "kernels_gpu.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["env"]["triton"]
    checked = {row["op"] for row in report["checks"]}
    assert {
        "low_rank_linear",
        "nm_linear",
        "dense_sparse_linear",
        "lora_linear",
        "dsee_linear",
        "dsee_nm_linear",
        "mezo_axpy_ vs ref",
        "mezo +e,-2e,+e drift",
    } <= checked
    assert all(row["ok"] for row in report["checks"])
    assert report["dry_run"]["rows"] > 0 and report["dry_run"]["errors"] == []
    assert "## Correctness" in (tmp_path / "kernels_gpu.md").read_text()

"""Outputs are checked before they are published: a diverged or non-finite result never lands in --out."""

from __future__ import annotations

import json

import pytest

from compressor.errors import ModelError
from compressor.outdir import MARKER
from compressor.pipeline import Pipeline

TINY_TRAIN = {"steps": 4, "batch_size": 2, "seq_len": 32, "num_eval": 2}


def test_diverged_finetune_is_kept_aside_not_published(tmp_path):
    out = tmp_path / "ft"
    pipeline = Pipeline.from_flags("backprop", {**TINY_TRAIN, "lr": 1e30}, out=str(out),
                                   evaluate={"num_windows": 2, "seq_len": 64})
    with pytest.raises(ModelError) as err:
        pipeline.run(quiet=True)
    message = str(err.value)
    assert "\n" not in message and "not usable" in message and "ft.failed" in message
    assert not out.exists()
    failed = tmp_path / "ft.failed"
    assert "nan" in json.loads((failed / MARKER).read_text())["failed"].lower()
    report = json.loads((failed / "report.json").read_text())
    # The loop stops at the first non-finite loss instead of running every step.
    assert len(report["stages"][0]["curves"]["loss"]) < TINY_TRAIN["steps"]


def test_finite_run_publishes_and_cleans_failed_leftovers_never(tmp_path):
    (tmp_path / "ft.failed").mkdir()
    (tmp_path / "ft.failed" / "mine.txt").write_text("user file")
    out = tmp_path / "ft"
    Pipeline.from_flags("backprop", {**TINY_TRAIN, "lr": 1e-4}, out=str(out), evaluate=False).run(quiet=True)
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    assert (tmp_path / "ft.failed" / "mine.txt").read_text() == "user file"

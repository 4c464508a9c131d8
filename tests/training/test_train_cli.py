"""`compressor finetune`: flags -> Pipeline -> outputs, and one-line errors with exit codes."""

from __future__ import annotations

import json

import typer
from compressor.cli.finetune import finetune
from typer.testing import CliRunner

app = typer.Typer()
app.command("finetune")(finetune)
app.command("noop")(
    lambda: None
)  # two commands: `finetune` stays a sub-command, as in the real app
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["finetune", *args])


def test_finetune_mezo_writes_checkpoint_report_and_log(tmp_path, tuning_text):
    out = tmp_path / "run"
    result = _run(
        "--method",
        "mezo",
        "--data",
        tuning_text,
        "--steps",
        "4",
        "--lr",
        "1e-4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--set",
        "num_eval=4",
        "--eval-windows",
        "2",
        "--out",
        str(out),
        "-q",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["stage"] == "mezo" and stage["config"]["steps"] == 4
    assert stage["metrics"]["steps"] == 4 and "perplexity_after" in stage["metrics"]
    assert len(stage["curves"]["loss"]) == 4
    lines = (out / "mezo_log.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["type"] == "header"
    assert (out / "model.safetensors").is_file()


def test_finetune_resumes_backprop_from_its_own_output(tmp_path, tuning_text):
    out = tmp_path / "run"
    common = [
        "--method",
        "backprop",
        "--data",
        tuning_text,
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--set",
        "num_eval=4",
        "--set",
        "checkpoint_every=2",
        "--eval-windows",
        "2",
        "--out",
        str(out),
        "-q",
    ]
    assert _run(*common, "--steps", "2").exit_code == 0
    result = _run(*common, "--steps", "4", "--resume", str(out))
    assert result.exit_code == 0, result.output
    stage = json.loads((out / "report.json").read_text())["stages"][0]
    assert stage["metrics"]["steps"] == 2  # steps 2 and 3 only
    # The resumed output keeps the checkpoint it started from, so it can be resumed again.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_finetune_errors_are_one_line_with_exit_codes(tmp_path, sentiment_tsv):
    result = _run("--method", "svd", "--out", str(tmp_path / "a"))
    assert result.exit_code == 2 and "not a fine-tuning method" in result.output
    result = _run("--method", "mezo", "--load-in", "3bit", "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "`--load-in` must be 4bit or 8bit" in result.output
    result = _run("--method", "mezo", "--set", "stepz=3", "--out", str(tmp_path / "c"))
    assert result.exit_code == 2 and "did you mean `steps`" in result.output
    result = _run(
        "--method",
        "backprop",
        "--task",
        "classification",
        "--data",
        sentiment_tsv,
        "--set",
        "label_column=target",
        "--set",
        "label_words={0: bad, 1: good}",
        "--out",
        str(tmp_path / "d"),
    )
    assert result.exit_code == 2 and "columns found: sentence, label" in result.output
    assert "Traceback" not in result.output

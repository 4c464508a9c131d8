"""One evaluation protocol: the same checkpoint gets the same perplexity from `eval`, `compress`,
`run` and `finetune` (its quality table and its own stage metrics)."""

import dataclasses
import json
import math

import pytest
from typer.testing import CliRunner

from compressor.cli.main import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def report(folder):
    return json.loads((folder / "report.json").read_text())


@pytest.mark.slow
def test_same_checkpoint_same_perplexity_everywhere(tmp_path):
    ckpt = tmp_path / "svd"
    invoke("compress", "--method", "svd", "--rank", "0.8", "--device", "cpu", "-q", "--out", ckpt)
    from_compress = report(ckpt)["evaluation"]["after"]["perplexity"]

    invoke("eval", ckpt, "--device", "cpu", "-q", "--out", tmp_path / "e")
    from_eval = json.loads((tmp_path / "e" / "eval.json").read_text())["perplexity"]

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ckpt}\ndevice: cpu\nstages:\n  - method: mezo\n    steps: 1\n")
    invoke("run", recipe, "-q", "--out", tmp_path / "run")
    from_run = report(tmp_path / "run")["evaluation"]["before"]["perplexity"]

    invoke("finetune", ckpt, "--method", "mezo", "--steps", "1", "--device", "cpu", "-q", "--out", tmp_path / "ft")
    tuned = report(tmp_path / "ft")
    from_finetune = tuned["evaluation"]["before"]["perplexity"]
    from_stage = tuned["stages"][0]["metrics"]["perplexity_before"]

    numbers = {"compress": from_compress, "eval": from_eval, "run": from_run, "finetune": from_finetune,
               "finetune stage": from_stage}
    print("perplexity of one checkpoint:", numbers)
    for where, value in numbers.items():
        assert math.isclose(value, from_eval, rel_tol=1e-6), (where, numbers)


def test_eval_reads_a_jsonl_text_column(tmp_path):
    lines = [json.dumps({"body": f"Tom had a red ball number {i}. He liked to play with it in the park."})
             for i in range(400)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    result = invoke("eval", "--data", tmp_path / "t.jsonl", "--text-column", "body", "--seq-len", "64",
                    "--eval-windows", "4", "--device", "cpu", "-q")
    assert "over 252 tokens (4 windows of 64)" in result.output
    assert "deprecated" not in result.output


def test_eval_num_windows_is_a_deprecated_alias_of_eval_windows():
    result = invoke("eval", "--num-windows", "2", "--device", "cpu", "-q")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert lines[0] == ("warning: --num-windows is deprecated; use --eval-windows (the name compress, finetune and "
                        "run use)")
    assert "(2 windows of 256)" in lines[-1]


def test_every_default_of_the_protocol_comes_from_compressor_protocol():
    """The CLI options, recipe `evaluate:` defaults and the evaluation functions read one dict."""
    import inspect

    from compressor import evaluation
    from compressor.cli.compress import compress as compress_command
    from compressor.cli.eval import eval_command
    from compressor.cli.finetune import finetune as finetune_command
    from compressor.protocol import PROTOCOL
    from compressor.recipe import EvaluateConfig

    assert evaluation.PROTOCOL is PROTOCOL
    defaults = {f.name: f.default for f in dataclasses.fields(EvaluateConfig)}
    assert {k: defaults[k] for k in PROTOCOL} == PROTOCOL
    options = inspect.signature(eval_command).parameters
    assert (options["seq_len"].default, options["eval_windows"].default, options["batch_size"].default) == (
        PROTOCOL["seq_len"], PROTOCOL["num_windows"], PROTOCOL["batch_size"])
    for command in (compress_command, finetune_command):
        assert inspect.signature(command).parameters["eval_windows"].default == PROTOCOL["num_windows"]
    heldout = inspect.signature(evaluation.heldout_windows).parameters
    assert (heldout["seq_len"].default, heldout["num_windows"].default) == (PROTOCOL["seq_len"], PROTOCOL["num_windows"])

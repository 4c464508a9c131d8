"""`compressor compare`: the Pareto front, settings and sorting as pure functions; on three
stories260K checkpoints (dense, svd-llm 0.8, prune 2:4) the table's perplexities equal
`compressor eval` on each; outputs (Markdown, JSON, PNG) and the one-line errors."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from compressor import compare as cmp
from compressor.cli.main import app
from compressor.errors import ConfigError
from compressor.models import DEFAULT_MODEL_DIR

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# -- pure functions --------------------------------------------------------------------------------


def test_pareto_front_keeps_the_rows_nothing_beats():
    points = [(1.0, 10.0), (2.0, 5.0), (3.0, 5.0), (0.5, 20.0), (2.5, math.inf), (4.0, 4.0), (1.0, 12.0)]
    assert cmp.pareto_front(points) == [0, 1, 3, 5]  # (3, 5) loses to (2, 5); (1, 12) to (1, 10)
    scores = [(1.0, 0.4), (2.0, 0.4), (3.0, 0.8), (0.5, 0.3)]
    assert cmp.pareto_front(scores, higher_is_better=True) == [0, 2, 3]
    assert cmp.pareto_front([(1.0, 2.0), (1.0, 2.0)]) == [0, 1]  # ties dominate nothing


def test_settings_show_headline_and_changed_fields_only():
    stage = {"method": "svd-llm", "rank": 0.8, "num_windows": 32, "damping": 0.5, "allocation": "uniform",
             "batch_size": 8, "targets": []}
    assert cmp.settings([stage]) == "rank=0.8, damping=0.5, allocation=uniform"
    assert cmp.settings([]) == "-"
    assert cmp.settings([{"method": "no-such-plugin", "x": 1}]) == "x=1"


def test_sort_rows_best_first_and_missing_last():
    rows = [{"name": "a", "bytes": 3, "t/acc": 0.5}, {"name": "b", "bytes": 1, "t/acc": None},
            {"name": "c", "bytes": 2, "t/acc": 0.7}]
    assert [r["name"] for r in cmp.sort_rows(rows, "bytes")] == ["b", "c", "a"]
    assert [r["name"] for r in cmp.sort_rows(rows, "t/acc")] == ["c", "a", "b"]  # scores: higher first


def test_sort_key_must_be_a_measured_column():
    cmp.check_sort_key("perplexity", [], False)
    cmp.check_sort_key("t/acc", ["t"], False)
    with pytest.raises(ConfigError, match="--speed"):
        cmp.check_sort_key("tokens_per_s", [], False)
    with pytest.raises(ConfigError, match="not a column"):
        cmp.check_sort_key("ppl", [], False)


def _fake_checkpoint(folder, source):
    folder.mkdir()
    quant = {"quant_method": "compressor", "method": "svd", "stages": [{"method": "svd", "rank": 0.5}],
             "source_model": source}
    (folder / "config.json").write_text(json.dumps({"quantization_config": quant}))
    return folder


def test_checkpoints_of_different_sources_are_refused_before_loading(tmp_path):
    a = _fake_checkpoint(tmp_path / "a", "default")
    b = _fake_checkpoint(tmp_path / "b", "HuggingFaceTB/SmolLM2-135M")
    result = invoke("compare", a, b)
    assert result.exit_code == 2 and result.output.startswith("error: the checkpoints come from 2 different")
    assert "--baseline" in result.output


def test_missing_run_dir_is_one_line(tmp_path):
    result = invoke("compare", tmp_path / "nope", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


# -- the acceptance run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """dense (the embedded model folder), svd-llm keep 0.8, prune 2:4 (magnitude)."""
    root = tmp_path_factory.mktemp("runs")
    assert invoke("compress", "--method", "svd-llm", "--rank", "0.8", "--calib-windows", "16",
                  "--out", root / "svd-llm", "-q").exit_code == 0
    assert invoke("compress", "--method", "prune", "--out", root / "prune", "-q").exit_code == 0
    return root, [DEFAULT_MODEL_DIR, root / "svd-llm", root / "prune"]


@pytest.mark.slow
def test_compare_perplexities_equal_compressor_eval(three_checkpoints, tmp_path):
    root, runs = three_checkpoints
    out = tmp_path / "cmp"
    result = invoke("compare", *runs, "--out", out, "--sort", "perplexity", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["stories260K", "svd-llm", "prune"]  # sorted by perplexity
    for row, run in zip(rows, runs):
        evaluated = invoke("eval", run, "--out", tmp_path / f"e-{row['name']}", "-q")
        assert evaluated.exit_code == 0, evaluated.output
        assert row["perplexity"] == json.loads((tmp_path / f"e-{row['name']}" / "eval.json").read_text())["perplexity"]
    dense, svd, prune = rows
    assert dense["baseline"] and dense["method"] == "dense" and dense["bytes_ratio"] == 1.0
    assert svd["method"] == "svd-llm" and "rank=0.8" in svd["settings"] and 0.75 < svd["bytes_ratio"] < 0.9
    assert prune["method"] == "prune" and "pattern=2:4" in prune["settings"] and prune["bytes_ratio"] < 0.7
    assert svd["parameters"] < dense["parameters"] and prune["bytes"] < svd["bytes"] < dense["bytes"]
    markdown = (out / "compare.md").read_text()
    assert "| stories260K | dense |" in markdown and "compare.png" in markdown
    assert (out / "compare.png").stat().st_size > 20_000  # a drawn figure, not an empty canvas


@pytest.mark.slow
def test_compare_with_tasks_speed_and_task_plot(three_checkpoints, tmp_path):
    from compressor.testing.lm_eval_tasks import write_mini_cloze

    pytest.importorskip("lm_eval")
    root, runs = three_checkpoints
    tasks = write_mini_cloze(tmp_path / "tasks")
    out = tmp_path / "cmp"
    result = invoke("compare", runs[1], runs[2], "--tasks", "mini_cloze", "--tasks-dir", tasks, "--speed",
                    "--sort", "mini_cloze/acc", "--plot-metric", "mini_cloze/acc", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert len(rows) == 3 and sum(r["baseline"] for r in rows) == 1  # the source row is added
    scores = [r["mini_cloze/acc"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert (out / "compare.png").is_file()

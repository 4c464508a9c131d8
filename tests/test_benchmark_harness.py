"""benchmarks/harness.py: the row cache keyed by config, atomic report writing, every committed
report regenerable from its JSON, and the frontier's Pareto front / GGUF point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import frontier  # noqa: E402
import harness  # noqa: E402


def render(state: dict) -> str:
    return "\n".join(harness.table(["label", "ppl"], [[r["label"], r["ppl"]] for r in state["rows"]])) + "\n"


def test_a_row_whose_config_is_unchanged_is_cached_and_force_or_a_new_config_reruns_it(tmp_path):
    report = harness.Report(tmp_path, "bench", render)
    report.state["env"] = {"date": "d", "git_sha": "g"}
    report.add("svd", {"keep": 0.6, "windows": 32}, {"ppl": 12.5})
    again = harness.Report(tmp_path, "bench", render)  # a second run reads the first one's JSON
    assert again.cached("svd", {"keep": 0.6, "windows": 32})["ppl"] == 12.5
    assert again.cached("svd", {"keep": 0.6, "windows": 64}) is None
    assert again.cached("svd", {"keep": 0.6, "windows": 32}, force=True) is None
    assert again.cached("asvd", {"keep": 0.6, "windows": 32}) is None
    again.add("svd", {"keep": 0.6, "windows": 64}, {"ppl": 11.0})  # replaces the label's row
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["label"], r["ppl"], r["run"]) for r in rows] == [("svd", 11.0, {"date": "d", "git_sha": "g"})]


def test_rows_written_before_keys_existed_count_as_measured_with_the_reports_sizes(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"sizes": {"calib_windows": 32}, "env": {"date": "x"},
                                                   "rows": [{"label": "dense", "ppl": 30.78}]}))
    report = harness.Report(tmp_path, "old", render)
    assert report.cached("dense", {"calib_windows": 32, "pattern": "2:4"})["ppl"] == 30.78
    assert report.cached("dense", {"calib_windows": 16}) is None
    (tmp_path / "nosizes.json").write_text(json.dumps({"rows": [{"label": "dense", "ppl": 1.0}]}))
    assert harness.Report(tmp_path, "nosizes", render).cached("dense", {"calib_windows": 32}) is None


def test_a_run_with_other_sizes_starts_the_report_afresh_and_one_with_the_same_sizes_keeps_its_rows(tmp_path):
    report = harness.Report(tmp_path, "bench", render)
    report.begin({"eval_windows": 16}, model="m")
    report.add("dense", {"eval_windows": 16}, {"ppl": 30.78})
    same = harness.Report(tmp_path, "bench", render)
    same.begin({"eval_windows": 16}, model="m2")
    assert [r["label"] for r in same.state["rows"]] == ["dense"] and same.state["model"] == "m2"
    other = harness.Report(tmp_path, "bench", render)
    other.begin({"eval_windows": 4}, model="m3")
    assert other.state == {"rows": [], "model": "m3", "sizes": {"eval_windows": 4}}


def test_reports_are_written_whole_and_render_rebuilds_the_markdown_from_the_json(tmp_path):
    report = harness.Report(tmp_path, "bench", render)
    report.add("dense", {}, {"ppl": 4.46})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no temporary left
    (tmp_path / "bench.md").unlink()
    assert harness.rerender(tmp_path, "bench", render) == "| label | ppl |\n|---|---|\n| dense | 4.46 |\n"
    with pytest.raises(SystemExit, match="bench2.json` not found"):
        harness.rerender(tmp_path, "bench2", render)


def test_every_committed_report_table_is_regenerated_identically_from_its_json(capsys):
    assert harness.check() == 0
    out = capsys.readouterr().out
    assert f"{len(harness.REPORT_RENDERERS)} of {len(harness.REPORT_RENDERERS)} reports" in out


def test_check_fails_on_a_report_whose_table_differs_from_its_json(tmp_path, capsys):
    for path in harness.REPORTS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
        if path.with_suffix(".md").is_file():
            (tmp_path / path.with_suffix(".md").name).write_text(path.with_suffix(".md").read_text())
    md = tmp_path / "quality_q2.md"
    md.write_text(md.read_text().replace("| 0.8 | svd | 166.013 |", "| 0.8 | svd | 166.014 |"))
    assert harness.check(tmp_path) == 1
    assert "DIFFERS  quality_q2.md" in capsys.readouterr().out


def test_the_pareto_front_holds_only_the_projects_undominated_points():
    rows = [{"label": "dense", "method": "dense", "stored_bytes": 100, "ppl": 30.0, "source": "lowrank"},
            {"label": "a", "method": "saes-svd", "stored_bytes": 60, "ppl": 50.0, "source": "lowrank"},
            {"label": "b", "method": "svd-llm", "stored_bytes": 60, "ppl": 70.0, "source": "lowrank"},
            {"label": "q", "method": "gptq", "stored_bytes": 40, "ppl": 45.0, "source": "quant"},
            {"label": "peer", "method": "llm-compressor", "stored_bytes": 30, "ppl": 31.0, "source": "llm-compressor"},
            {"label": "gguf", "method": "Q4_1 (GGUF)", "stored_bytes": 20, "ppl": 30.0, "source": "gguf"}]
    assert frontier.pareto(rows) == {"dense", "q"}  # a is beaten by q; the peer and the GGUF are not ours
    assert [frontier.card_method({"label": lab, "method": m}) for lab, m in
            (("saes-svd-aware-0.6", "saes-svd"), ("sparsegpt-2:4", "sparsegpt"), ("gptq-w4-g64-r8", "gptq"),
             ("gptq-w4-g64", "gptq"), ("dsformer-stf30", "dsformer"))] == [
        "low rank", "N:M", "low rank", "–", "low rank + N:M"]


def test_the_frontier_draws_the_gguf_source_at_its_bytes_and_the_dense_perplexity():
    state = json.loads((harness.REPORTS / "frontier.json").read_text())
    rows = frontier.all_rows(state)
    dense = next(r for r in rows if r["label"] == "dense")
    gguf = next(r for r in rows if r["source"] == "gguf")
    assert gguf["stored_bytes"] == 98362432 and gguf["ppl"] == dense["ppl"]
    assert round(gguf["stored_bytes"] / dense["stored_bytes"], 3) == 0.366
    peer = {r["label"]: round(r["ppl"], 2) for r in rows if r["source"] == "llm-compressor"}
    assert peer == {"llm-compressor rtn-int4-g64": 44.96, "llm-compressor gptq-int4-g64": 41.76,
                    "llm-compressor rtn-int8-g64": 30.85, "llm-compressor gptq-int3-g64": 185.73}


def test_numeric_flags_take_their_defaults_type_and_sizes_of_reads_a_runs_sizes():
    parser = harness.arguments("doc", threads=None)
    harness.numbers(parser, (("steps", 3), ("heal-lr", 3e-4), ("eval-windows", None)))
    args = parser.parse_args(["--steps", "5", "--heal-lr", "1e-3"])
    assert (args.steps, args.heal_lr, args.eval_windows) == (5, 1e-3, None)
    assert parser.parse_args(["--eval-windows", "4"]).eval_windows == 4  # None default: an int flag
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "2.5"])
    assert harness.sizes_of(args, ("steps", "heal_lr")) == {"steps": 5, "heal_lr": 1e-3}


def test_a_column_spec_fills_templates_and_functions_and_markdown_joins_the_non_empty_blocks():
    rows = [{"label": "svd", "ppl": 12.3456, "beta": None}, {"label": "asvd", "ppl": 7.0, "beta": 0.25}]
    spec = [("method", "{label}"), ("perplexity", "{ppl:.2f}"), ("β", lambda r: harness.fmt(r["beta"], 1))]
    assert harness.columns(spec, rows) == ["| method | perplexity | β |", "|---|---|---|",
                                           "| svd | 12.35 | – |", "| asvd | 7.00 | 0.2 |"]
    assert harness.markdown("# T", [], ["a", "b"], "") == "# T\n\na\nb\n"
    assert harness.pick(None, ["dense", "q"]) == ["dense", "q"] and harness.pick("q", ["dense", "q"]) == ["q"]
    with pytest.raises(SystemExit, match=r"unknown row label\(s\) \['x'\]; choose from dense,q"):
        harness.pick("q,x", ["dense", "q"])


def test_a_report_that_names_rows_by_label_and_keep_caches_and_replaces_each_keep_apart(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"sizes": {"w": 8}, "rows": [
        {"label": "svd", "keep": 0.8, "ppl": 166.0}, {"label": "svd", "keep": 0.6, "ppl": 987.2}]}))
    report = harness.Report(tmp_path, "q", render, same=("label", "keep"))
    assert report.cached("svd", {"keep": 0.6, "method": "svd", "w": 8})["ppl"] == 987.2  # a pre-key row: its keep
    assert report.cached("svd", {"keep": 0.4, "method": "svd", "w": 8}) is None
    report.add("svd", {"keep": 0.6, "w": 8}, {"keep": 0.6, "ppl": 990.0})
    assert [(r["keep"], r["ppl"]) for r in report.state["rows"]] == [(0.8, 166.0), (0.6, 990.0)]

"""PNG plots from report records, including per-module rows that lack a `type` key."""

from __future__ import annotations

from compressor.report.plots import plot_per_layer, plot_spectra, render_plots
from compressor.report.records import Report, StageRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(rows: list[dict], stage: str = "prune") -> StageRecord:
    return StageRecord(
        stage=stage,
        kind="compress",
        config={},
        metrics={},
        per_module=rows,
        notes=[],
        curves={},
        artifacts={},
        seconds=0.0,
    )


# Rows as dsformer/maestro/prune may write them: a rank, a module name, no `type`.
UNTYPED = [
    {"module": "model.layers.0.self_attn.q_proj", "rank": 8},
    {"module": "model.layers.0.mlp.down_proj", "rank": 4},
    {"module": "model.layers.1.self_attn.q_proj", "rank": 6},
    {"rank": 2},  # no module name either
]


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC)
    assert data.startswith(PNG_MAGIC)


def test_row_type_falls_back_to_the_module_leaf_then_other():
    from compressor.report.plots import _row_type

    assert [_row_type(row) for row in UNTYPED] == ["q_proj", "down_proj", "q_proj", "other"]
    assert _row_type({"module": "model.layers.0.mlp.up_proj", "type": "custom"}) == "custom"
    assert _row_type({"module": "", "rank": 1}) == "other"


def test_plot_per_layer_accepts_rows_without_type(tmp_path):
    name = plot_per_layer(_record(UNTYPED), tmp_path, "rank", "rank kept", "ranks.png")
    assert name == "ranks.png"
    _assert_png(tmp_path / "ranks.png")


def test_render_plots_writes_rank_plot_for_untyped_rows(tmp_path):
    report = Report(stages=[_record(UNTYPED, stage="maestro")])
    assert render_plots(report, tmp_path) == ["ranks_0_maestro.png"]
    _assert_png(tmp_path / "ranks_0_maestro.png")


def test_plot_spectra_groups_untyped_rows_by_module_leaf(tmp_path):
    rows = [
        {"module": "layers.0.q_proj", "spectrum": [4.0, 2.0, 1.0]},
        {"module": "layers.0.o_proj", "spectrum": [3.0, 1.0, 0.5]},
        {"spectrum": [1.0, 0.1]},
    ]
    assert plot_spectra(_record(rows, stage="analyze"), tmp_path) == "spectra.png"
    _assert_png(tmp_path / "spectra.png")


def test_plot_per_layer_still_accepts_typed_rows(tmp_path):
    rows = [{"module": "layers.0.q_proj", "type": "q_proj", "rank": 3}]
    plot_per_layer(_record(rows), tmp_path, "rank", "rank kept", "typed.png")
    _assert_png(tmp_path / "typed.png")


def test_block_labels_sit_under_the_middle_of_their_group_and_the_legend_follows_the_bars():
    from compressor.report.plots import MAX_LABELLED_BARS, _bar_labels, _types_in_order

    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows = [{"module": f"model.layers.{b}.x.{leaf}"} for b in range(30) for leaf in leaves]
    assert len(rows) > MAX_LABELLED_BARS
    ticks, labels, xlabel = _bar_labels(rows)
    assert labels == [str(b) for b in range(30)] and xlabel.startswith("transformer block")
    assert ticks[0] == 3.0 and ticks[-1] == 29 * 7 + 3.0  # bars 0..6 and 203..209: their middles
    assert _types_in_order([r["module"].rsplit(".", 1)[-1] for r in rows]) == leaves


def test_compression_rank_plot_shows_the_kept_fraction_against_the_keep_ratio(tmp_path):
    rows = [{"module": "model.layers.0.self_attn.q_proj", "rank": 25, "params_dense": 4096, "params_kept": 3200},
            {"module": "model.layers.0.mlp.down_proj", "rank": 0, "params_dense": 11008, "params_kept": 11008}]
    record = _record(rows, stage="svd-llm")
    record.config = {"rank": 0.8, "allocation": "uniform"}
    assert render_plots(Report(stages=[record]), tmp_path) == ["ranks_0_svd-llm.png"]
    _assert_png(tmp_path / "ranks_0_svd-llm.png")


def test_an_adapter_rank_plot_with_one_rank_everywhere_is_skipped(tmp_path):
    rows = [{"module": f"model.layers.{b}.self_attn.q_proj", "rank": 8} for b in range(3)]
    record = _record(rows, stage="lora")
    record.kind = "finetune"
    assert render_plots(Report(stages=[record]), tmp_path) == []

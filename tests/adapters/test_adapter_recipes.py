"""Every adapter recipe validates and runs end to end through the Pipeline with a 2-step budget
(the real budgets and gates run in about 20 s each: `compressor run recipes/<name>.yaml`)."""

from pathlib import Path

import pytest
import torch

from compressor.models import load
from compressor.pipeline import Pipeline
from compressor.testing.tiny import example_input_ids

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = ["evaluate.num_windows=2", "evaluate.seq_len=64", "gates={}"]


def _fast(stage: int, retune: bool = False) -> list[str]:
    extra = [f"stages.{stage}.retune_steps=2"] if retune else []
    return [
        f"stages.{stage}.steps=2",
        f"stages.{stage}.num_eval=2",
        f"stages.{stage}.seq_len=32",
        *extra,
    ]


@pytest.mark.parametrize(
    "name, overrides, layer",
    [
        ("lora", _fast(0), "lora"),
        ("nola", _fast(0), "nola"),
        ("dsee", [*_fast(0, retune=True), "stages.0.grebsmo_iterations=2"], "dsee"),
        ("kappatune", _fast(0), "lora"),
    ],
)
def test_recipe_runs_and_its_checkpoint_reloads(name, overrides, layer, tmp_path):
    pipeline = Pipeline.from_file(
        RECIPES / f"{name}.yaml", [*FAST, *overrides, f"out={tmp_path / 'run'}"]
    )
    report, loaded = pipeline.run(quiet=True)
    assert report.stages[0].metrics["steps"] == 2
    manifest_types = {spec["type"] for spec in _manifest(tmp_path / "run")["layers"].values()}
    assert manifest_types == {layer}
    ids = example_input_ids()
    with torch.no_grad():
        expected = loaded.model(ids).logits
        torch.testing.assert_close(load(tmp_path / "run")(ids).logits, expected, rtol=0, atol=1e-5)


def test_welore_tune_recipe_compresses_then_tunes_the_factors():
    pipeline = Pipeline.from_file(RECIPES / "welore-tune.yaml", [*FAST, *_fast(1)])
    report, _ = pipeline.run(quiet=True)
    assert [s.stage for s in report.stages] == ["welore", "welore-tune"]
    assert report.stages[1].metrics["lrc_layers"] > 0 and report.stages[1].metrics["steps"] == 2


def _manifest(folder: Path) -> dict:
    import json

    return json.loads((folder / "compression.json").read_text())

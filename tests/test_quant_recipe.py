"""A recipe's top-level `calibration` reaches every stage that calibrates (gptq's `calibration`)
or heals (heal's training `data`), in one place; a stage's own value wins."""

from __future__ import annotations

import pytest
from compressor.cli.main import app
from typer.testing import CliRunner

from compressor.pipeline import Pipeline
from compressor.recipe import load_recipe

TWO_STAGES = "stages:\n  - {method: gptq, bits: 4, group_size: 0}\n  - {method: heal, steps: 1}\n"


def test_set_calibration_fills_both_the_quantize_and_the_heal_stage(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TWO_STAGES)
    pipeline = Pipeline.from_recipe(load_recipe(recipe, ["calibration=notes.txt"]))
    quantize, heal = (stage.config for stage in pipeline.stages)
    assert quantize.calibration == "notes.txt" and heal.data == "notes.txt"
    resolved = pipeline.to_recipe()
    assert resolved["calibration"] == "notes.txt" and resolved["stages"][1]["data"] == "notes.txt"


def test_a_stage_that_names_its_own_text_keeps_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: notes.txt\nstages:\n  - {method: gptq, bits: 4, group_size: 0, "
                      "calibration: default}\n  - {method: heal, steps: 1, data: train.txt}\n  - {method: svd}\n")
    quantize, heal, svd = (stage.config for stage in Pipeline.from_file(recipe).stages)
    assert quantize.calibration == "default" and heal.data == "train.txt"
    assert "calibration" not in svd.to_dict()  # data-free: nothing to fill


@pytest.mark.slow
def test_the_run_reads_the_top_level_text(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TWO_STAGES)
    missing = tmp_path / "no-such-text.txt"
    result = CliRunner().invoke(app, ["run", str(recipe), "--set", f"calibration={missing}", "--out",
                                      str(tmp_path / "out"), "-q"])
    text = result.output.strip()
    assert result.exit_code != 0 and str(missing) in text and "\n" not in text, text
    assert not (tmp_path / "out").exists()

"""Every recipe in recipes/ validates and runs end to end on the embedded stories260K, with its
quality gates, exactly as users' CI would run it (`compressor run recipe.yaml`)."""

import json
from pathlib import Path

import pytest
import yaml

from compressor.pipeline import Pipeline

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_method():
    from compressor.registry import method_names

    names = {stage["method"] for p in RECIPES for stage in yaml.safe_load(p.read_text())["stages"]}
    missing = set(method_names()) - names
    assert not missing, f"methods without a recipe in recipes/: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_and_passes_its_gates(recipe, tmp_path):
    from typer.testing import CliRunner

    from compressor.cli.main import app

    Pipeline.from_file(recipe)  # validates before anything loads
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert all(g["passed"] for g in report["gates"])
    assert (tmp_path / "o" / "recipe.resolved.yaml").is_file()

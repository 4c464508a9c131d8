"""Adding a method is one module plus one line: a dummy compression method, its config and its
apply in ONE module written into tmp_path, and that module's name added to `registry.BUILTIN`,
appears in `compressor methods`, runs from a recipe and from `compressor compress --method dummy`
with the commands' flags, and nothing else is touched."""

import json
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from compressor import registry
from compressor.cli.main import app
from compressor.models import load_model

DUMMY = '''"""Dummy: multiply every targeted weight by `rank` (a test of the registry)."""

from dataclasses import dataclass

import torch

from compressor.config import CalibrationConfig
from compressor.registry import register
from compressor.report.records import StageResult
from compressor.targeting import select_linears


@dataclass(frozen=True, kw_only=True)
class DummyConfig(CalibrationConfig, num_windows=4, seq_len=16, method="dummy", kind="compress", apply=__name__):
    """Args:
        rank: the factor every targeted weight is multiplied by.
    """

    rank: float = 0.5


@register(DummyConfig)
def apply(model, config, ctx):
    windows = ctx.windows(config.calibration, split="calib", seq_len=config.seq_len,
                          num_windows=config.num_windows)
    modules = select_linears(model, config.targets, config.ignore)
    with torch.no_grad():
        for module in modules.values():
            module.weight.mul_(config.rank)
    return StageResult(metrics={"scaled": len(modules), "windows": int(windows.shape[0])})
'''


@pytest.fixture
def dummy(tmp_path, monkeypatch):
    (tmp_path / "dummy_method.py").write_text(DUMMY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_BY_NAME", dict(registry._BY_NAME))  # forgotten after the test
    monkeypatch.setattr(registry, "_BY_CONFIG", dict(registry._BY_CONFIG))
    monkeypatch.setattr(registry, "_DECLARED_IN", dict(registry._DECLARED_IN))
    assert "dummy" not in registry.method_names()  # the module alone is not enough...
    # ...the one line a new method adds:
    monkeypatch.setattr(registry, "BUILTIN", (*registry.BUILTIN, "dummy_method"))
    yield
    sys.modules.pop("dummy_method", None)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_dummy_is_listed_with_its_fields_and_defaults(dummy):
    listing = cli("methods")
    assert listing.exit_code == 0, listing.output
    summary = "Dummy: multiply every targeted weight by `rank` (a test of the registry)."  # its module docstring
    assert ["dummy", "compress", summary] in [line.split(None, 2) for line in listing.output.splitlines()]
    fields = cli("methods", "dummy")
    assert fields.exit_code == 0, fields.output
    rows = {line.split()[0]: line.split()[1] for line in fields.output.splitlines()[3:] if line.strip()}
    # its own field, and the calibration defaults it states once in its class line
    assert rows["rank"] == "0.5" and rows["num_windows"] == "4" and rows["seq_len"] == "16"
    assert rows["batch_size"] == "8" and rows["calibration"] == "default"
    assert registry.method_info("dummy").offloadable


@pytest.mark.slow  # loads and writes stories260K
def test_dummy_runs_from_a_recipe(dummy, tmp_path):
    recipe = tmp_path / "dummy.yaml"
    recipe.write_text(yaml.safe_dump({"evaluate": False, "stages": [{"method": "dummy", "rank": 0.25}]}))
    result = cli("run", recipe, "--out", tmp_path / "o", "-q")
    assert result.exit_code == 0, result.output
    stage = json.loads((tmp_path / "o" / "report.json").read_text())["stages"][0]
    assert stage["stage"] == "dummy" and stage["config"]["rank"] == 0.25 and stage["metrics"]["windows"] == 4
    dense, scaled = load_model(None).model, load_model(str(tmp_path / "o")).model
    name = "model.layers.0.mlp.up_proj"
    assert torch.allclose(scaled.get_submodule(name).weight, 0.25 * dense.get_submodule(name).weight)


@pytest.mark.slow
def test_dummy_runs_from_compress_flags(dummy, tmp_path):
    result = cli("compress", "--method", "dummy", "--rank", "0.75", "--calib-windows", "3", "--targets", "up_proj",
                 "--eval-windows", "2", "--out", tmp_path / "o", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["config"]["rank"] == 0.75 and stage["config"]["num_windows"] == 3
    assert stage["metrics"] == {**stage["metrics"], "windows": 3, "scaled": 5}  # stories260K: 5 blocks
    assert report["evaluation"]["after"]["perplexity"] > report["evaluation"]["before"]["perplexity"]


def test_dummy_flags_it_lacks_and_the_wrong_command_are_one_line_errors(dummy, tmp_path):
    result = cli("compress", "--method", "dummy", "--allocation", "welore", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "`--allocation` does not apply to method `dummy`" in result.output
    result = cli("finetune", "--method", "dummy", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "use `compressor compress --method dummy`" in result.output
    assert not (tmp_path / "o").exists()

"""Every adapter recipe validates and runs end to end through the Pipeline with a 2-step budget
(the real budgets and gates run in about 20 s each: `compressor run recipes/<name>.yaml`)."""

from pathlib import Path

import pytest
import torch

from compressor.adapters import dsee, nola
from compressor.models import load_model
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
    "name, overrides",
    [
        ("lora", _fast(0)),
        ("nola", _fast(0)),
        ("dsee", [*_fast(0, retune=True), "stages.0.grebsmo_iterations=2"]),
        ("kappatune", _fast(0)),
    ],
)
def test_recipe_runs_and_writes_its_adapter_alone(name, overrides, tmp_path):
    """An unmerged adapter run writes the adapter folder and the report, never a model folder that
    would pass for the base model; the adapter applied to a fresh base gives the run's outputs."""
    pipeline = Pipeline.from_file(
        RECIPES / f"{name}.yaml", [*FAST, *overrides, f"out={tmp_path / 'run'}"]
    )
    report, loaded = pipeline.run(quiet=True)
    assert report.stages[0].metrics["steps"] == 2
    out = tmp_path / "run"
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "report.json").is_file()
    ids = example_input_ids()
    with torch.no_grad():
        expected = loaded.model(ids).logits
        adapted = _apply_adapter(name, load_model(None).model, out / "adapter")
        torch.testing.assert_close(adapted(ids).logits, expected, rtol=0, atol=1e-5)


def _apply_adapter(name, base, folder):
    if name in ("lora", "kappatune"):
        import peft

        return peft.PeftModel.from_pretrained(base, folder)
    if name == "nola":
        nola.load_nola_adapter(base, folder)
    else:
        dsee.load_dsee_adapter(base, folder)
    return base


def test_welore_tune_recipe_compresses_then_tunes_the_factors():
    pipeline = Pipeline.from_file(RECIPES / "welore-tune.yaml", [*FAST, *_fast(1)])
    report, _ = pipeline.run(quiet=True)
    assert [s.stage for s in report.stages] == ["welore", "welore-tune"]
    assert report.stages[1].metrics["lrc_layers"] > 0 and report.stages[1].metrics["steps"] == 2

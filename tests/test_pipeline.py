
import pytest
import torch
import yaml

from compressor.errors import ConfigError, GateError
from compressor.layers import LowRankLinear
from compressor.models import LoadedModel, load, read_manifest, save
from compressor.pipeline import Pipeline, evaluate_gates
from compressor.recipe import apply_overrides
from compressor.targeting import replace_module
from compressor.testing import tiny_llama
from compressor.testing.tiny import example_input_ids


def test_recipe_errors_name_stage_and_suggest():
    with pytest.raises(ConfigError, match=r"stages\[0\] \(analyze\): unknown key `topp`.*did you mean `top_p`"):
        Pipeline.from_recipe({"stages": [{"method": "analyze", "topp": 0.1}]})
    with pytest.raises(ConfigError, match=r"stages\[1\]: unknown method `analyse`"):
        Pipeline.from_recipe({"stages": [{"method": "analyze"}, {"method": "analyse"}]})
    with pytest.raises(ConfigError, match=r"`top_p` must be a number, got 'high'"):
        Pipeline.from_recipe({"stages": [{"method": "analyze", "top_p": "high"}]})
    with pytest.raises(ConfigError, match="unknown top-level key `stage`; did you mean `stages`"):
        Pipeline.from_recipe({"stage": []})
    with pytest.raises(ConfigError, match="unknown gate `max_pp`"):
        Pipeline.from_recipe({"stages": [{"method": "analyze"}], "gates": {"max_pp": 3}})


def test_overrides():
    recipe = {"seed": 0, "stages": [{"method": "analyze", "top_p": 0.2}]}
    apply_overrides(recipe, ["seed=3", "top_p=0.5"])
    assert recipe["seed"] == 3 and recipe["stages"][0]["top_p"] == 0.5
    apply_overrides(recipe, ["stages.0.top_p=0.25"])
    assert recipe["stages"][0]["top_p"] == 0.25
    apply_overrides(recipe, ["stages.0.top_p=2e-1"])  # YAML 1.1 alone would give the string '2e-1'
    assert recipe["stages"][0]["top_p"] == 0.2
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(recipe, ["seed"])


def test_resolved_recipe_round_trips():
    pipeline = Pipeline.from_recipe({"stages": [{"method": "analyze", "top_p": 0.3}]})
    again = Pipeline.from_recipe(yaml.safe_load(yaml.safe_dump(pipeline.to_recipe())))
    assert again.stages[0].config == pipeline.stages[0].config


def test_gates():
    ok = evaluate_gates({"max_ppl_increase": 0.1}, {"before": {"perplexity": 10.0}, "after": {"perplexity": 10.5}})
    assert ok[0]["passed"] and ok[0]["value"] == pytest.approx(0.05)
    bad = evaluate_gates({"max_ppl": 5.0}, {"after": {"perplexity": 6.0}})
    assert not bad[0]["passed"]


def test_gate_missed_raises_after_writing(tmp_path, stories):
    recipe = {"stages": [{"method": "analyze"}], "gates": {"max_ppl": 1.0}, "out": str(tmp_path / "o"),
              "evaluate": {"num_windows": 2, "seq_len": 64}}
    pipeline = Pipeline.from_recipe(recipe)
    # analyze alone does not change the model, so no evaluation happens and the gate cannot be judged
    with pytest.raises(ConfigError, match="gate `max_ppl` needs an evaluation"):
        pipeline.run(quiet=True, loaded=stories)


def test_compressed_checkpoint_round_trip(tmp_path, tokenizer):
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj"
    weight = model.get_submodule(name).weight.detach()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    replace_module(model, name, LowRankLinear.from_factors(u[:, :8] * s[:8], vh[:8]))
    ids = example_input_ids()
    expected = model(ids).logits
    save(model, tmp_path / "ckpt", tokenizer)
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["layers"][name] == {"type": "low_rank", "args": {"in_features": 32, "out_features": 64,
                                                                     "rank": 8, "bias": False}}
    reloaded = load(tmp_path / "ckpt")
    assert isinstance(reloaded.get_submodule(name), LowRankLinear)
    assert torch.equal(reloaded(ids).logits, expected)


def test_failed_run_leaves_nothing(tmp_path, stories):
    class Boom(Exception):
        pass

    pipeline = Pipeline.from_recipe({"stages": [{"method": "analyze"}], "out": str(tmp_path / "o")})

    def explode(*_args, **_kwargs):
        raise Boom

    pipeline._run_stages = explode
    with pytest.raises(Boom):
        pipeline.run(quiet=True, loaded=LoadedModel(stories.model, stories.tokenizer, "default", True))
    assert list(tmp_path.iterdir()) == []


def test_gate_error_type():
    assert GateError("x").exit_code == 3


@pytest.mark.parametrize("rank, writes", [("0", True), ("1", False)])
def test_only_rank_zero_writes_outputs_under_a_launcher(tmp_path, monkeypatch, rank, writes):
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "o"
    recipe = {"out": str(out), "evaluate": False, "stages": [{"method": "svd", "rank": 0.8}]}
    report, _ = Pipeline.from_recipe(recipe).run(quiet=True)
    assert report.stages[0].metrics["layers_factored"] > 0  # every rank does the work
    assert out.exists() is writes
    assert list(tmp_path.iterdir()) == ([out] if writes else [])  # no staging leftovers


def test_a_stage_looks_its_method_up_once_and_turns_its_config_into_a_dict_once(tmp_path, stories, monkeypatch):
    """Issue 20: the registry lookup and the config's dict happen when the recipe is parsed, not at
    every later step (preflight, output claim, plan line, estimate, record, resolved recipe)."""
    import compressor.pipeline as pipeline_module
    from compressor.methods.svd import SVDConfig

    lookups, dicts = [], []
    real_lookup, real_to_dict = pipeline_module.get_method, SVDConfig.to_dict
    monkeypatch.setattr(pipeline_module, "get_method", lambda name: lookups.append(name) or real_lookup(name))
    monkeypatch.setattr(SVDConfig, "to_dict", lambda self: dicts.append(1) or real_to_dict(self))
    recipe = {"out": str(tmp_path / "o"), "evaluate": {"num_windows": 2, "seq_len": 64},
              "stages": [{"method": "svd", "rank": 0.8}]}
    pipeline = Pipeline.from_recipe(recipe)
    report, _ = pipeline.run(quiet=True, loaded=stories)
    assert lookups == ["svd"] and len(dicts) == 1
    assert report.stages[0].config["rank"] == 0.8 and report.stages[0].kind == "compress"
    assert yaml.safe_load((tmp_path / "o" / "recipe.resolved.yaml").read_text())["stages"][0]["rank"] == 0.8

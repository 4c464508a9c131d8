"""The low-rank stages on tiny models built in code: identity at keep 1, validation errors,
calibration size checks, architectures (GQA Llama, BERT, GPT-2 Conv1D), reporting, reloading."""

from __future__ import annotations

import pytest
import torch

from compressor.context import Context
from compressor.errors import ConfigError, DataError
from compressor.layers import LowRankLinear, compressed_layers
from compressor.methods.asvd import ASVDConfig
from compressor.methods.lowrank import split_phases
from compressor.methods.saes_svd import SAESConfig
from compressor.methods.svd import SVDConfig
from compressor.methods.svd_llm import SVDLLMConfig
from compressor.methods.welore import WeLoreConfig
from compressor.registry import apply_
from compressor.testing.tiny import example_input_ids, tiny_bert, tiny_gpt2, tiny_llama

CALIB = {"num_windows": 64, "seq_len": 32, "batch_size": 16}
CONFIGS = {
    "svd": lambda keep, **kw: SVDConfig(rank=keep, **kw),
    "asvd": lambda keep, **kw: ASVDConfig(rank=keep, **CALIB, **kw),
    "svd-llm": lambda keep, **kw: SVDLLMConfig(rank=keep, **CALIB, **kw),
    "svd-llm+update": lambda keep, **kw: SVDLLMConfig(rank=keep, update="true", **CALIB, **kw),
    "saes-svd": lambda keep, **kw: SAESConfig(rank=keep, **CALIB, **kw),
    "welore": lambda keep, **kw: WeLoreConfig(rank=keep, **kw),
    "welore-allocated saes-svd": lambda keep, **kw: SAESConfig(
        rank=keep, allocation="welore", **CALIB, **kw
    ),
}


@pytest.fixture(scope="module")
def ctx():
    from compressor.models import default_tokenizer

    return Context(tokenizer=default_tokenizer(), quiet=True)


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keep_one_reproduces_every_layer_exactly(name, ctx):
    model, ids = tiny_llama(), example_input_ids()
    before = outputs(model, ids)
    result = apply_(model, CONFIGS[name](1.0), ctx)
    assert not compressed_layers(model)
    assert torch.equal(outputs(model, ids), before)
    assert result.metrics["keep_ratio_reached"] == 1.0 and result.metrics["layers_factored"] == 0


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "build", [tiny_llama, tiny_bert, tiny_gpt2], ids=["gqa-llama", "bert", "gpt2-conv1d"]
)
def test_every_method_factors_every_architecture_at_the_planned_rank(name, build, ctx):
    model, ids = build(), example_input_ids()
    result = apply_(model, CONFIGS[name](0.5), ctx)
    layers = compressed_layers(model)
    assert len(layers) == result.metrics["layers_factored"] > 0
    rows = {r["module"]: r for r in result.per_module}
    for layer_name, layer in layers.items():
        assert isinstance(layer, LowRankLinear) and layer.rank == rows[layer_name]["rank"]
        assert rows[layer_name]["params_kept"] == layer.u.numel() + layer.v.numel()
    assert torch.isfinite(outputs(model, ids)).all()
    metrics = result.metrics
    assert metrics["params_kept"] == sum(r["params_kept"] for r in result.per_module)
    assert metrics["keep_ratio_reached"] == pytest.approx(
        metrics["params_kept"] / metrics["params_dense"]
    )
    assert (
        metrics["keep_ratio_reached"] <= 0.5
        and metrics["peak_memory_mb"] >= 0
        and metrics["seconds"] > 0
    )


def test_uniform_keep_ratio_reached_within_rounding(ctx):
    model = tiny_llama(hidden=64, intermediate=172)  # stories260K's shapes
    result = apply_(model, SVDConfig(rank=0.6), ctx)
    reached, dense = result.metrics["keep_ratio_reached"], result.metrics["params_dense"]
    slack = (
        sum(
            int(r["shape"].split("x")[0]) + int(r["shape"].split("x")[1]) for r in result.per_module
        )
        / dense
    )
    assert 0.6 - slack < reached <= 0.6


def test_saes_with_beta_zero_gives_svd_llm_factors(ctx):
    a, b = tiny_llama(), tiny_llama()
    apply_(a, SAESConfig(rank=0.5, beta=0.0, damping=0.0, **CALIB), ctx)
    apply_(b, SVDLLMConfig(rank=0.5, update="false", damping=0.0, **CALIB), ctx)
    for (name, la), lb in zip(compressed_layers(a).items(), compressed_layers(b).values()):
        torch.testing.assert_close(la.u, lb.u, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(la.v, lb.v, rtol=0, atol=1e-6, msg=name)


def test_saes_reports_beta_per_layer_within_the_caps(ctx):
    result = apply_(tiny_llama(), SAESConfig(rank=0.5, **CALIB), ctx)
    betas = [r["beta"] for r in result.per_module]
    assert betas and all(0.2 <= b <= 0.428571 for b in betas)
    assert all(0 < r["rer"] <= 1 for r in result.per_module)
    assert result.metrics["beta_min_chosen"] >= 0.2


def test_calibration_is_sequential_and_two_phase(ctx):
    names = {
        f"model.layers.0.{n}": None
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.o_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    _, second = split_phases(names, SVDLLMConfig().second_phase)
    assert set(second) == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    bert = {
        "encoder.layer.0.attention.output.dense": None,
        "encoder.layer.0.intermediate.dense": None,
        "encoder.layer.0.output.dense": None,
    }
    assert set(split_phases(bert, SVDLLMConfig().second_phase)[1]) == {
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
    }
    # Block 1's statistics come from the compressed block 0: compressing only block 1 gives other factors.
    full, late = tiny_llama(), tiny_llama()
    apply_(full, SVDLLMConfig(rank=0.5, **CALIB), ctx)
    apply_(late, SVDLLMConfig(rank=0.5, targets=("re:model\\.layers\\.1\\..*",), **CALIB), ctx)
    diff = (
        full.model.layers[1].self_attn.q_proj.dense_weight()
        - late.model.layers[1].self_attn.q_proj.dense_weight()
    )
    assert diff.abs().max() > 1e-4


def test_rank_deficient_inputs_fall_back_to_a_shift_with_a_note(ctx):
    model = tiny_llama()
    with (
        torch.no_grad()
    ):  # a dead channel: zero norm weight -> q/k/v/… see an exactly zero input feature
        model.model.layers[0].input_layernorm.weight[3] = 0.0
    result = apply_(model, SVDLLMConfig(rank=0.5, **CALIB), ctx)
    shifted = [r for r in result.per_module if r.get("cholesky_shift", 0) > 0]
    assert any(r["module"] == "model.layers.0.self_attn.q_proj" for r in shifted)
    assert any("model.layers.0.self_attn.q_proj" in n and "shift" in n for n in result.notes)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_asvd_dead_channel_is_floored_with_a_note(ctx):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = 0.0
    result = apply_(model, ASVDConfig(rank=0.5, **CALIB), ctx)
    row = next(r for r in result.per_module if r["module"] == "model.layers.0.mlp.up_proj")
    assert row["scales_floored"] == 1 and any("up_proj" in n for n in result.notes)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [SVDConfig, ASVDConfig, SVDLLMConfig, SAESConfig, WeLoreConfig])
@pytest.mark.parametrize("rank", [0.0, -0.2, 1.5])
def test_rank_outside_zero_one_is_a_config_error(cls, rank):
    with pytest.raises(ConfigError, match=r"`rank` is the keep ratio .* must be in \(0, 1\]"):
        cls(rank=rank)
    with pytest.raises(ConfigError, match="`rank`"):
        cls.from_dict({"rank": rank})


def test_other_bad_fields_are_config_errors():
    with pytest.raises(ConfigError, match="`update` must be auto, true or false"):
        SVDLLMConfig(update="sometimes")
    with pytest.raises(ConfigError, match="`beta` must be in"):
        SAESConfig(beta=1.0)
    with pytest.raises(ConfigError, match="`num_windows` must be a positive integer"):
        ASVDConfig(num_windows=0)
    with pytest.raises(ConfigError, match="`allocation` must be `welore`"):
        WeLoreConfig(allocation="uniform")
    with pytest.raises(ConfigError, match="`allocation`"):
        SVDConfig.from_dict({"allocation": "greedy"})
    assert SVDLLMConfig.from_dict({"update": True}).update == "true"


def test_targets_matching_nothing_lists_real_names(ctx):
    with pytest.raises(ConfigError, match=r"matched no linear.*q_proj"):
        apply_(tiny_llama(), SVDConfig(rank=0.5, targets=("qproj",)), ctx)


def test_few_calibration_windows_warn_and_empty_text_errors(ctx, tmp_path):
    with pytest.warns(UserWarning, match="only 4 calibration windows"):
        result = apply_(tiny_llama(), SVDLLMConfig(rank=0.5, num_windows=4, seq_len=32), ctx)
    assert any("only 4 calibration windows" in n for n in result.notes)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        apply_(tiny_llama(), SVDLLMConfig(rank=0.5, calibration=str(empty)), ctx)


def test_out_of_block_linears_stay_dense_with_a_note(ctx):
    model = tiny_llama()
    result = apply_(model, SVDLLMConfig(rank=0.5, targets=("q_proj", "lm_head"), **CALIB), ctx)
    row = next(r for r in result.per_module if r["module"] == "lm_head")
    assert (
        not row["factored"]
        and row["rank"] == 32
        and "outside the transformer blocks" in row["status"]
    )
    assert any("lm_head" in n and "`ignore`" in n for n in result.notes)

"""maestro: exact initialisation, ordered-dropout + hierarchical group lasso recovering the SVD
order, shrinking, the single-layer sampler, budget truncation, checkpoints and errors."""

from __future__ import annotations

import json

import pytest
import torch

import compressor
from compressor.context import Context
from compressor.errors import ConfigError
from compressor.layers import LowRankLinear
from compressor.methods import maestro
from compressor.methods._factors import svd_factors
from compressor.methods._maestro_layer import (
    MaestroLinear,
    SingleLayerSampler,
    allocate_ranks,
    group_lasso,
    kept_rank,
    lowrank_params,
    ordered_factors,
    output_metric_scale,
    rank_importance,
)
from compressor.methods._maestro_train import MaestroSchedule, maestro_step, shrink
from compressor.testing.tiny import example_input_ids, tiny_llama


def test_full_width_reproduces_the_svd_factorisation():
    weight, x = torch.randn(24, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    u, v = ordered_factors(weight)
    layer = MaestroLinear(u, v, None)
    torch.testing.assert_close(layer(x), x @ weight.T)
    for width in (1, 4, 9):  # a truncated pass is the rank-`width` truncated SVD
        su, sv = svd_factors(weight, width)
        layer.width = width
        torch.testing.assert_close(layer(x), x @ (su @ sv).T)


def test_whitened_init_is_exact_and_ordered_by_output_energy():
    weight = torch.randn(12, 10, dtype=torch.float64)
    x = torch.randn(500, 10, dtype=torch.float64) * torch.logspace(-1, 1, 10, dtype=torch.float64)
    h = x.T @ x
    u, v = ordered_factors(weight, h)
    torch.testing.assert_close(u @ v, weight)
    # each rank's output energy ||u_i|| * ||v_i x|| is non-increasing: ordered for this data
    energy = u.norm(dim=0) * (v @ x.T).norm(dim=1)
    assert bool((energy[:-1] >= energy[1:] - 1e-9).all())


def test_output_metric_importance_follows_the_whitened_spectrum_and_factor_norms_do_not():
    weight = torch.randn(24, 24, dtype=torch.float64)
    x = torch.randn(4000, 24, dtype=torch.float64) * torch.logspace(-3, 0, 24, dtype=torch.float64)
    h = x.T @ x / 4000
    u, v = ordered_factors(weight, h)
    ridge = 1e-6 * h.diagonal().mean() * torch.eye(24, dtype=h.dtype)
    spectrum = torch.linalg.svdvals(weight @ torch.linalg.cholesky(h + ridge))
    nuclear_tail = spectrum.flip(0).cumsum(0).flip(0)
    scale = output_metric_scale(v, h)
    output = rank_importance(u, v, scale)
    # in the calibration metric, importance_i / importance_0 is the whitened nuclear tail share
    torch.testing.assert_close(output / output[0], nuclear_tail / nuclear_tail[0], atol=1e-4, rtol=0)
    # the plain factor norms carry ||L^-T q_i||, which silent input directions inflate
    plain = rank_importance(u, v)
    assert float((plain / plain[0] - nuclear_tail / nuclear_tail[0]).abs().max()) > 0.05
    # the scale keeps the total of ||v_i||^2 (so shrinking thresholds stay on the same scale)
    torch.testing.assert_close((v.square().sum(1) * scale.square()).sum(), v.square().sum())


def _toy_target(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    q1, _ = torch.linalg.qr(torch.randn(n, n))
    q2, _ = torch.linalg.qr(torch.randn(n, n))
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    return q1 @ torch.diag(sigma) @ q2.T, sigma


def _train_toy(target: torch.Tensor, maestro_loss: bool, steps: int = 300) -> MaestroLinear:
    n = target.shape[0]
    layer = MaestroLinear(torch.randn(n, n) * 0.3, torch.randn(n, n) * 0.3, None)
    sampler = SingleLayerSampler({"layer": n}, seed=0)
    opt = torch.optim.SGD([layer.u, layer.v], lr=0.02, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(256, n)
        y = x @ target.T
        loss = (layer(x) - y).square().sum(1).mean()
        if maestro_loss:
            layer.width = next(sampler)[1]
            loss = loss + (layer(x) - y).square().sum(1).mean() + 1e-2 * layer.group_lasso()
            layer.width = None
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer


def test_group_lasso_and_ordered_dropout_recover_the_svd_order_on_linear_regression():
    target, sigma = _toy_target()
    u, v = _train_toy(target, maestro_loss=True).factors()
    per_rank = u.norm(dim=0) * v.norm(dim=1)
    # trailing (unneeded) ranks are driven to zero, the leading ones carry the singular values in order
    torch.testing.assert_close(per_rank[:5], sigma[:5], atol=0.05, rtol=0.05)
    assert float(per_rank[5:].max()) < 1e-4
    for r in range(1, 6):  # every prefix is the best rank-r approximation (Eckart-Young)
        err = float((u[:, :r] @ v[:r] - target).square().sum())
        assert err == pytest.approx(float(sigma[r:].square().sum()), abs=0.05)
    assert kept_rank(rank_importance(u, v), 1e-3) == 5
    # control: the same training without ordered dropout / group lasso fits W but orders nothing
    u0, v0 = _train_toy(target, maestro_loss=False, steps=150).factors()
    torch.testing.assert_close(u0 @ v0, target, atol=1e-2, rtol=1e-2)
    assert float((u0.norm(dim=0) * v0.norm(dim=1))[5:].max()) > 0.05


def test_group_lasso_matches_its_definition():
    u, v = torch.randn(6, 4), torch.randn(4, 5)
    expected = sum(float(v[i:].norm() + u[:, i:].norm()) for i in range(4))
    assert float(group_lasso(u, v)) == pytest.approx(expected, rel=1e-5)
    importance = rank_importance(u, v)
    assert float(importance[2]) == pytest.approx(float(v[2:].norm() * u[:, 2:].norm()), rel=1e-5)


def test_shrinking_removes_only_ranks_below_the_threshold():
    scales = torch.tensor([3.0, 2.0, 1.0, 1e-2, 1e-4, 1e-6])
    u = torch.eye(6)[:, :6] * scales.sqrt()
    v = torch.eye(6) * scales.sqrt()[:, None]
    layer = MaestroLinear(u, v, None)
    importance = layer.importance()  # tail sums of the scales: 6.0102..., 3.0102..., ...
    threshold = (
        float(importance[3]) * 0.999
    )  # rank 3 (importance ~1.01e-2) survives, rank 4 does not
    assert shrink({"l": layer}, threshold) == {"l": 4}
    kept = layer.importance()[: layer.rank]
    assert bool((kept >= threshold).all()) and float(layer.importance()[4]) < threshold
    assert shrink({"l": layer}, threshold) == {
        "l": 4
    }  # idempotent: cut ranks still count in the tails
    layer.width = None
    torch.testing.assert_close(layer(torch.eye(6)), (torch.eye(6) @ (u[:, :4] @ v[:4]).T))
    assert shrink({"l": layer}, 1e9) == {"l": 1}  # a layer never loses its last rank


def test_single_layer_sampler_visits_every_layer_width_pair_once_per_pass():
    sampler = SingleLayerSampler({"a": 3, "b": 2}, seed=1)
    first = [next(sampler) for _ in range(len(sampler))]
    assert sorted(first) == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]
    second = [next(sampler) for _ in range(len(sampler))]
    assert sorted(second) == sorted(first)


def test_a_step_truncates_exactly_one_layer():
    model = tiny_llama()
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    layers = {}
    for name in names:
        linear = model.get_submodule(name)
        layers[name] = MaestroLinear(*(t.float() for t in ordered_factors(linear.weight)), None)
        compressor.targeting.replace_module(model, name, layers[name])
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, *_: seen.append(mod.width)) for m in layers.values()
    ]
    maestro_step(model, layers, example_input_ids(), (names[1], 3), MaestroSchedule())
    for hook in hooks:
        hook.remove()
    assert seen == [None, None, None, 3]  # full pass (both full), then only q_proj at width 3
    assert all(layer.width is None for layer in layers.values())


def test_budget_allocation_respects_the_budget_and_keeps_prefixes():
    importance = {"a": torch.tensor([10.0, 5.0, 1.0, 0.1]), "b": torch.tensor([2.0, 1.9, 1.8, 0.2])}
    shapes = {"a": (8, 8), "b": (8, 8)}
    ranks = allocate_ranks(importance, shapes, budget=5 * 16)
    assert sum(lowrank_params(8, 8, r) for r in ranks.values()) <= 80
    assert ranks == {
        "a": 2,
        "b": 3,
    }  # relative importance: b's 0.95, 0.9 beat a's 0.5 ... then a's 0.5
    assert allocate_ranks(importance, shapes, budget=0) == {"a": 1, "b": 1}


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"rank": 1.5}, r"`rank`.*\(0, 1\]"),
        ({"from_trained": "run/"}, r"`from_trained`.*`rank` is required"),
        ({"init_rank": 0.0}, r"`init_rank`"),
        ({"optimizer": "adam"}, r"adam"),
        ({"curve_keeps": (0.5, 2.0)}, r"`curve_keeps`"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        maestro.MaestroConfig.from_dict(fields)


def test_train_save_reload_and_truncate_from_trained(tmp_path):
    model = tiny_llama()
    ctx = Context.for_model(model, quiet=True)
    config = maestro.MaestroConfig(
        init="whitened",
        init_rank=0.25,
        epochs=1,
        train_windows=4,
        batch_size=2,
        seq_len=32,
        num_windows=4,
        eval_windows=2,
        curve_keeps=(0.3, 1.0),
        lr=1e-2,
    )
    result = maestro.apply(model, config, ctx)
    assert len(result.curves["train_loss"]) == 2 and len(result.curves["curve_ppl"]) == 2
    assert result.metrics["keep_ratio_reached"] <= 0.5 + 1e-9
    assert all(
        isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith("up_proj")
    )
    ids = example_input_ids()
    expected = model(input_ids=ids).logits
    compressor.save(model, tmp_path / "trained")
    torch.testing.assert_close(
        compressor.load(tmp_path / "trained")(input_ids=ids).logits, expected
    )
    base = tiny_llama()
    truncated = maestro.apply(
        base,
        maestro.MaestroConfig(from_trained=str(tmp_path / "trained"), rank=0.3, eval_windows=0),
        ctx,
    )
    assert truncated.metrics["keep_ratio_reached"] <= 0.3
    trained_ranks = {r["module"]: r["rank"] for r in result.per_module}
    assert all(r["rank"] <= trained_ranks[r["module"]] for r in truncated.per_module)
    layer = base.get_submodule("model.layers.0.mlp.up_proj")
    trained_layer = compressor.load(tmp_path / "trained").get_submodule(
        "model.layers.0.mlp.up_proj"
    )
    torch.testing.assert_close(
        layer.u, trained_layer.u[:, : layer.rank]
    )  # a prefix of the trained factors


def test_cli_train_then_truncate_a_dense_materialised_run_keeps_its_trained_order(tmp_path):
    from compressor.cli.main import app
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    common = ["--set", "eval_windows=2", "--set", "seq_len=32", "--eval-windows", "2", "-q"]
    run = tmp_path / "run"
    train = ["compress", "--method", "maestro", "--set", "epochs=1", "--set", "train_windows=4"]
    result = CliRunner().invoke(app, [*train, *common, "--out", str(run)])
    assert result.exit_code == 0, result.output
    # learned ranks are full here, so every layer was materialised dense; the factors file keeps them
    saved = load_file(str(run / maestro.FACTORS_FILE))
    report = json.loads((run / "report.json").read_text())["stages"][0]
    assert report["metrics"]["layers_dense"] == report["metrics"]["layers"]
    cut = tmp_path / "cut"
    truncate = ["compress", "--method", "maestro", "--from-trained", str(run), "--rank", "0.5"]
    result = CliRunner().invoke(app, [*truncate, *common, "--out", str(cut)])
    assert result.exit_code == 0, result.output
    stage = json.loads((cut / "report.json").read_text())["stages"][0]
    assert not stage["notes"] and stage["metrics"]["keep_ratio_reached"] <= 0.5
    layer = compressor.load(cut).get_submodule("model.layers.0.mlp.up_proj")
    torch.testing.assert_close(layer.u, saved["model.layers.0.mlp.up_proj.u"][:, : layer.rank])

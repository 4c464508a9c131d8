"""MeZO (METHODS §11): SPSA arithmetic, determinism, log replay, and that it actually tunes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import functional_call

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.testing import tiny_llama
from compressor.testing.tiny import example_input_ids
from compressor.training import fit
from compressor.training.losses import lm_loss, next_token_loss
from compressor.training.mezo import MezoConfig, apply
from compressor.training.mezo_optimizer import (
    LOG_NAME,
    mezo_update_,
    noise,
    perturb_,
    read_log,
    spsa_gradient,
    step_seed,
)
from compressor.training.run import decays


def _params(model):
    return dict(model.named_parameters())


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_perturb_and_restore_returns_the_original_weights(stories):
    params = list(stories.model.parameters())
    before = [p.detach().clone() for p in params]
    seed = step_seed(0, 7)
    perturb_(params, seed, 1e-3)
    moved = max((p - b).abs().max().item() for p, b in zip(params, before))
    perturb_(params, seed, -2e-3)
    perturb_(params, seed, 1e-3)
    drift = max((p - b).abs().max().item() for p, b in zip(params, before))
    assert moved > 1e-3  # the perturbation really happened (|z| reaches several sigma)
    assert drift <= 1e-6


def test_projected_gradient_equals_the_finite_difference_with_the_same_z():
    model = tiny_llama().double()
    names, params = zip(*model.named_parameters())
    batch = {"input_ids": example_input_ids(batch=2, seq_len=12)}
    eps, seed = 1e-3, 12345
    z = noise(list(params), seed)

    def loss_with(sign):  # independent: build theta +- eps z explicitly, no in-place perturbation
        weights = {n: p.detach() + sign * eps * zi for n, p, zi in zip(names, params, z)}
        logits = functional_call(model, weights, (batch["input_ids"],)).logits
        return next_token_loss(logits, batch["input_ids"]).item()

    expected = (loss_with(+1) - loss_with(-1)) / (2 * eps)
    grad, _, _ = spsa_gradient(list(params), lambda: lm_loss(model, batch).item(), seed, eps)
    assert grad == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert abs(grad) > 1e-3  # a real signal, not a degenerate zero


def test_update_is_sgd_along_z_with_decay_only_on_matrices():
    model = tiny_llama().double()
    named = _params(model)
    params = list(named.values())
    decay = [decays(n, p) for n, p in named.items()]
    assert any(decay) and not all(decay)  # norms are excluded
    before = [p.detach().clone() for p in params]
    seed, grad, lr, wd = 99, 0.7, 1e-2, 0.1
    mezo_update_(params, seed, grad, lr, wd, decay)
    for p, b, zi, d in zip(params, before, noise(params, seed), decay):
        expected = b - lr * (grad * zi + (wd * b if d else 0.0))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def _config(data, **kw):
    base = {
        "steps": 6,
        "lr": 1e-4,
        "batch_size": 4,
        "seq_len": 32,
        "num_eval": 4,
        "data": data,
        "seed": 3,
    }
    return MezoConfig(**{**base, **kw})


def test_two_runs_with_the_same_seed_give_identical_weights(ctx, tuning_text):
    weights = []
    for _ in range(2):
        model = tiny_llama()
        apply(model, _config(tuning_text), ctx)
        weights.append(_snapshot(model))
    changed = _snapshot(tiny_llama())
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert any(not torch.equal(weights[0][n], changed[n]) for n in changed)


def test_resume_replays_the_log_to_the_same_weights(tokenizer, tuning_text, tmp_path):
    full = tiny_llama()
    apply(
        full, _config(tuning_text), Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path / "a")
    )
    header, records = read_log(tmp_path / "a")
    assert [r["step"] for r in records] == list(range(6)) and header["eps"] == 1e-3

    first_half = tiny_llama()
    apply(
        first_half,
        _config(tuning_text, steps=3),
        Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path / "b"),
    )
    resumed = tiny_llama()
    ctx_c = Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path / "c")
    result = apply(resumed, _config(tuning_text, resume=str(tmp_path / "b")), ctx_c)
    assert result.metrics["steps"] == 3  # only steps 3..5 ran
    expected, got = _snapshot(full), _snapshot(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert len(read_log(tmp_path / "c")[1]) == 6  # the new log holds the whole trajectory


def test_interrupted_staged_run_keeps_its_log_and_resumes(tokenizer, tuning_text, tmp_path):
    calls = {"n": 0}

    def interrupting_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 9:  # two losses per step: steps 0..3 finish, step 4 is interrupted
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    staged = tmp_path / ".run.tmp-x1"
    model = tiny_llama()
    config = _config(tuning_text)
    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            _params(model),
            config,
            Context(tokenizer=tokenizer, quiet=True, out_dir=staged),
            loss_fn=interrupting_loss,
            method="mezo",
        )
    partial = tmp_path / "run.partial"
    assert len(read_log(partial)[1]) == 4
    resumed = tiny_llama()
    apply(
        resumed, _config(tuning_text, resume=str(partial)), Context(tokenizer=tokenizer, quiet=True)
    )
    full = tiny_llama()
    apply(full, config, Context(tokenizer=tokenizer, quiet=True))
    expected, got = _snapshot(full), _snapshot(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_resume_refuses_a_log_of_another_model_or_method(tokenizer, tuning_text, tmp_path):
    apply(
        tiny_llama(),
        _config(tuning_text, steps=2),
        Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path),
    )
    other = tiny_llama(layers=3)
    with pytest.raises(ConfigError, match=r"`resume`: .*fingerprint"):
        apply(
            other,
            _config(tuning_text, resume=str(tmp_path)),
            Context(tokenizer=tokenizer, quiet=True),
        )
    header, records = read_log(tmp_path)
    header["method"] = "sorted"
    (tmp_path / LOG_NAME).write_text("\n".join(json.dumps(x) for x in [header, *records]))
    with pytest.raises(ConfigError, match="written by method `sorted`"):
        apply(
            tiny_llama(),
            _config(tuning_text, resume=str(tmp_path)),
            Context(tokenizer=tokenizer, quiet=True),
        )


def test_mezo_with_lora_trains_only_the_adapters(ctx, tuning_text):
    model = tiny_llama()
    base = _snapshot(model)
    config = _config(
        tuning_text,
        adapter="lora",
        lora_r=4,
        targets=("q_proj", "v_proj"),
        lr=5e-3,
        mezo_eps=1e-2,
    )
    result = apply(model, config, ctx)
    q_proj = model.model.layers[0].self_attn.q_proj  # now a LoraLinear: frozen W + trained A, B
    per_layer = 4 * (32 + 32) + 4 * (32 + 16)  # r (in + out) for q (32 -> 32) and v (32 -> 16, GQA)
    assert result.metrics["trainable_params"] == 2 * per_layer
    assert q_proj.lora_b.abs().max() > 0  # B left its zero init
    adapted = {n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    now = dict(model.named_parameters())
    for name, value in base.items():  # every original weight, adapted or not, is unchanged
        assert torch.equal(now[name], value), name
    assert len(adapted) == 4


@pytest.mark.slow
def test_mezo_lowers_held_out_perplexity_on_the_tuning_text(stories, ctx, tuning_text):
    config = MezoConfig(steps=25, lr=3e-4, batch_size=8, seq_len=64, num_eval=16, data=tuning_text)
    result = apply(stories.model, config, ctx)
    before, after = result.metrics["perplexity_before"], result.metrics["perplexity_after"]
    assert after < 0.9 * before, (before, after)
    assert result.curves["loss"] and len(result.curves["loss"]) == 25


def test_mezo_config_errors():
    with pytest.raises(ConfigError, match="`adapter` must be null"):
        MezoConfig(adapter="prefix")
    with pytest.raises(ConfigError, match="`optimizer` must be 'mezo'"):
        MezoConfig(optimizer="adamw")

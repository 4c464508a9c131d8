"""The backprop trainer: schedules, accumulation, checkpoints/resume, subsets, classification."""

from __future__ import annotations

import math

import pytest
import torch

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.testing import tiny_bert, tiny_llama
from compressor.testing.tiny import example_input_ids, tiny_gpt2
from compressor.training import TrainConfig, fit
from compressor.training.backprop import BackpropConfig, apply
from compressor.training.losses import lm_loss
from compressor.training.run import lr_factor
from compressor.training.sorted_ft import SortedConfig
from compressor.training.sorted_ft import apply as sorted_apply


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_lr_schedules():
    cosine = TrainConfig(steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cosine) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cosine) == 1.0 and lr_factor(7, cosine) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 5 / 8))
    )
    linear = TrainConfig(steps=10, schedule="linear")
    assert [lr_factor(s, linear) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(9, TrainConfig(steps=10)) == 1.0


def test_backprop_lowers_held_out_perplexity(stories, ctx, tuning_text):
    config = BackpropConfig(
        steps=12, lr=2e-3, batch_size=8, seq_len=64, num_eval=16, data=tuning_text, eval_every=6
    )
    result = apply(stories.model, config, ctx)
    assert result.metrics["perplexity_after"] < 0.8 * result.metrics["perplexity_before"]
    assert result.metrics["trainable_params"] == 260_032 and result.metrics["tokens_per_s"] > 0
    assert result.metrics["eval_steps"] == "0,6,12"
    curve = result.curves["eval_perplexity"]  # held between evaluations, on the steps' x axis
    assert len(curve) == 13 and curve[0] == curve[5] != curve[6] == curve[11] != curve[12]
    assert curve[12] == result.metrics["perplexity_after"]
    assert len(result.curves["loss"]) == 12 and result.metrics["peak_memory_mb"] > 0


def test_gradient_accumulation_matches_one_big_batch(ctx, tuning_text):
    models = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = tiny_llama()
        config = TrainConfig(
            steps=2,
            lr=1e-2,
            batch_size=batch_size,
            grad_accum=accum,
            seq_len=32,
            num_eval=4,
            data=tuning_text,
        )
        fit(model, list(model.parameters()), config, ctx)
        models.append(_snapshot(model))
    for name in models[0]:
        torch.testing.assert_close(models[0][name], models[1][name], rtol=0, atol=2e-6)


def test_only_the_given_parameters_train_and_flags_are_restored(ctx, tuning_text):
    model = tiny_llama()
    before = _snapshot(model)
    chosen = {n: p for n, p in model.named_parameters() if "q_proj" in n}
    result = fit(
        model,
        chosen,
        TrainConfig(steps=2, lr=1e-2, batch_size=4, seq_len=32, num_eval=4, data=tuning_text),
        ctx,
    )
    after = _snapshot(model)
    assert result.trainable_params == sum(p.numel() for p in chosen.values())
    assert all(not torch.equal(before[n], after[n]) for n in chosen)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in chosen)
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are back


def _interrupt_at(call: int):
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    return loss


def test_checkpoint_and_resume_continue_at_the_right_step(tokenizer, tuning_text, tmp_path):
    config = BackpropConfig(
        steps=6,
        lr=5e-3,
        batch_size=4,
        seq_len=32,
        num_eval=4,
        data=tuning_text,
        checkpoint_every=2,
        weight_decay=0.1,
        schedule="cosine",
        warmup_steps=1,
    )
    straight = tiny_llama()
    apply(straight, config, Context(tokenizer=tokenizer, quiet=True))

    interrupted = tiny_llama()
    staged = tmp_path / ".run.tmp-abc"
    with pytest.raises(KeyboardInterrupt):  # steps 0..4 finish, step 5 is interrupted
        fit(
            interrupted,
            dict(interrupted.named_parameters()),
            config,
            Context(tokenizer=tokenizer, quiet=True, out_dir=staged),
            loss_fn=_interrupt_at(6),
            method="backprop",
        )
    partial = tmp_path / "run.partial" / "checkpoints"
    assert sorted(p.name for p in partial.iterdir()) == ["step-2", "step-4", "step-5"]

    resumed = tiny_llama()
    result = apply(
        resumed,
        config.replace(resume=str(tmp_path / "run.partial")),
        Context(tokenizer=tokenizer, quiet=True),
    )
    assert result.metrics["steps"] == 1 and len(result.curves["loss"]) == 1
    assert _same(_snapshot(straight), _snapshot(resumed))


def test_resume_refuses_another_method_or_model(tokenizer, tuning_text, tmp_path):
    config = BackpropConfig(
        steps=2, lr=1e-3, batch_size=4, seq_len=32, num_eval=4, data=tuning_text, checkpoint_every=2
    )
    apply(tiny_llama(layers=3), config, Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path))
    quiet = Context(tokenizer=tokenizer, quiet=True)
    with pytest.raises(
        ConfigError, match=r"written by method `backprop`.*this run is method `sorted`"
    ):
        sorted_apply(
            tiny_llama(layers=3),
            SortedConfig(
                steps=3,
                batch_size=4,
                seq_len=32,
                num_eval=4,
                data=tuning_text,
                resume=str(tmp_path),
            ),
            quiet,
        )
    with pytest.raises(ConfigError, match="fingerprint"):
        apply(tiny_llama(layers=2), config.replace(resume=str(tmp_path)), quiet)
    with pytest.raises(ConfigError, match="no checkpoint found"):
        apply(tiny_llama(layers=3), config.replace(resume=str(tmp_path / "nothing")), quiet)


def test_bf16_autocast_trains_fp32_weights(ctx, tuning_text):
    model = tiny_llama()
    result = fit(
        model,
        list(model.parameters()),
        TrainConfig(
            steps=2,
            lr=1e-3,
            batch_size=4,
            seq_len=32,
            num_eval=4,
            data=tuning_text,
            mixed_precision="bf16",
        ),
        ctx,
    )
    assert all(math.isfinite(v) for v in result.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_prompt_classification_with_label_words(stories, ctx, sentiment_tsv):
    config = BackpropConfig(
        task="classification",
        data=sentiment_tsv,
        label_words={0: "sad", 1: "happy"},
        prompt="{text}. She was",
        steps=15,
        lr=2e-3,
        batch_size=8,
        seq_len=32,
        num_eval=40,
    )
    result = apply(stories.model, config, ctx)
    assert result.metrics["accuracy_after"] >= 0.95
    assert result.metrics["accuracy_after"] > result.metrics["accuracy_before"]


def test_encoder_gets_a_classification_head(ctx, sentiment_tsv):
    model = tiny_bert()
    config = BackpropConfig(
        task="classification",
        data=sentiment_tsv,
        steps=30,
        lr=3e-3,
        batch_size=8,
        seq_len=16,
        num_eval=40,
    )
    result = apply(model, config, ctx)
    assert hasattr(model, "classification_head")
    assert result.metrics["accuracy_after"] >= 0.9
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_chunked_no_grad_loss_equals_the_full_logits_loss(build, monkeypatch):
    from compressor.training import losses

    model = build()
    ids = example_input_ids(batch=3, seq_len=40)
    full = losses.next_token_loss(model(input_ids=ids).logits, ids)
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 512 * 7)  # 7 positions per chunk: many chunks
    assert losses.can_chunk_logits(model)
    with torch.no_grad():
        chunked = losses.lm_loss(model, {"input_ids": ids})
    torch.testing.assert_close(chunked, full.detach(), rtol=1e-6, atol=1e-5)

"""Sorted fine-tuning (METHODS §10): the objective, the sub-models, and that early exits improve."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import ConfigError
from compressor.evaluation import exit_logits
from compressor.testing import tiny_llama
from compressor.testing.tiny import example_input_ids
from compressor.training.losses import next_token_loss
from compressor.training.sorted_ft import SortedConfig, apply, default_exits, sorted_loss, truncated


def test_default_exits():
    assert default_exits(5) == [2, 3, 4, 5]  # stories260K
    assert default_exits(30) == [9, 12, 15, 18, 21, 24, 27, 30]  # SmolLM2-135M
    assert default_exits(40) == [
        12,
        16,
        20,
        24,
        28,
        32,
        36,
        40,
    ]  # the paper's eight LLaMA-2-13B sub-models
    assert default_exits(1) == [1]


def test_loss_is_the_sum_of_independently_computed_exit_losses(stories):
    model = stories.model
    batch = {"input_ids": example_input_ids(batch=2, seq_len=24)}
    exits = [2, 3, 5]
    expected = []
    for n in exits:  # the explicit sub-model: only the first n blocks exist during the forward
        with truncated(model, n):
            expected.append(
                next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
            )
    total = sorted_loss(model, batch, exits)
    torch.testing.assert_close(total, torch.stack(expected).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sorted_loss(model, batch, exits, "mean"), torch.stack(expected).mean(), rtol=1e-5, atol=1e-5
    )
    assert len({round(e.item(), 3) for e in expected}) == 3  # the exits really differ


def test_truncated_sub_model_matches_the_early_exit_reader():
    model = tiny_llama(layers=3)
    ids = example_input_ids()
    for n in (1, 2, 3):
        with truncated(model, n):
            sub = model(input_ids=ids).logits
        torch.testing.assert_close(sub, exit_logits(model, ids, n), rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == 3  # restored


@pytest.mark.slow
def test_sorted_lowers_every_early_exit_perplexity(stories, ctx, tuning_text):
    config = SortedConfig(
        steps=12, lr=2e-3, batch_size=8, seq_len=64, num_eval=16, data=tuning_text
    )
    result = apply(stories.model, config, ctx)
    m = result.metrics
    assert m["exits"] == "2,3,4,5"
    for n in (2, 3, 4):
        assert m[f"perplexity_exit{n}_after"] < 0.5 * m[f"perplexity_exit{n}_before"], n
    assert m["perplexity_exit5_after"] < m["perplexity_exit5_before"]


def test_sorted_config_errors(ctx):
    with pytest.raises(ConfigError, match="`task` must be 'lm'"):
        SortedConfig(task="classification")
    with pytest.raises(ConfigError, match="`exit_weighting` must be 'sum' or 'mean'"):
        SortedConfig(exit_weighting="max")
    with pytest.raises(ConfigError, match=r"exceed the model's 2 layers"):
        apply(tiny_llama(), SortedConfig(exits=(1, 4), steps=1), ctx)

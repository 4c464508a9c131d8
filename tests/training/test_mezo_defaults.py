"""MeZO with every default (lr, steps, eps, data) lowers held-out perplexity of the embedded model."""

import pytest

from compressor import evaluation
from compressor.context import Context
from compressor.models import load_model
from compressor.registry import apply_
from compressor.training.config import DEFAULT_LR
from compressor.training.mezo import MezoConfig


@pytest.mark.slow
def test_mezo_defaults_lower_heldout_perplexity_of_stories260k():
    loaded = load_model(None)
    windows = evaluation.heldout_windows(loaded.tokenizer)
    before = evaluation.perplexity(loaded.model, windows)["perplexity"]
    config = MezoConfig()
    assert config.lr is None and config.learning_rate == DEFAULT_LR["mezo"] and config.steps == 100
    result = apply_(loaded.model, config, Context(tokenizer=loaded.tokenizer, quiet=True))
    after = evaluation.perplexity(loaded.model, windows)["perplexity"]
    print(f"MeZO defaults on stories260K: held-out perplexity {before:.4f} -> {after:.4f}")
    # Measured 3.9929 -> 3.9749 (seed 0); demand at least a quarter of that gain, not noise.
    assert after < before * (1 - 0.001), (before, after)
    assert result.metrics["perplexity_after"] == pytest.approx(after, rel=1e-6)

"""Fixtures for the adapter tests: a quiet Context on the real stories260K checkpoint, and a
short training budget that still moves held-out perplexity."""

from __future__ import annotations

import pytest

from compressor.context import Context
from compressor.models import load_model



@pytest.fixture
def short_fit():
    """Enough steps at a high rate for stories260K to improve measurably on held-out TinyStories,
    few enough that one fit takes about a second on one core."""
    return {"steps": 12, "batch_size": 8, "seq_len": 64, "num_eval": 16}


@pytest.fixture
def stories_model():
    """(model, Context) for the real stories260K with its tokenizer; nothing is written."""
    loaded = load_model(None)
    return loaded.model, Context(tokenizer=loaded.tokenizer, quiet=True)


@pytest.fixture
def out_ctx(tmp_path):
    """A Context on stories260K's tokenizer that writes artifacts into tmp_path."""
    loaded = load_model(None)
    return Context(tokenizer=loaded.tokenizer, quiet=True, out_dir=tmp_path)

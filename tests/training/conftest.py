"""Fixtures for the training tests: a small synthetic tuning text and labelled files."""

from __future__ import annotations

import random

import pytest

from compressor.context import Context


@pytest.fixture(scope="session")
def tuning_text(tmp_path_factory):
    """A narrow, repetitive text stories260K has not seen: tuning lowers its perplexity fast."""
    rng = random.Random(0)
    names, things = ["Tom", "Sue", "Max", "Amy"], ["red ball", "big box", "small cat", "green hat"]
    lines = [
        f"{rng.choice(names)} has a {rng.choice(things)}. {rng.choice(names)} likes the {rng.choice(things)}."
        for _ in range(3000)
    ]
    path = tmp_path_factory.mktemp("text") / "tuning.txt"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="session")
def sentiment_tsv(tmp_path_factory):
    """A separable two-label task: label 1 texts praise, label 0 texts complain."""
    rng = random.Random(1)
    good, bad = ["fun", "happy", "nice", "great"], ["sad", "bad", "dull", "awful"]
    rows = ["sentence\tlabel"]
    for i in range(240):
        label = i % 2
        words = good if label else bad
        rows.append(f"the day was {rng.choice(words)} and {rng.choice(words)}\t{label}")
    path = tmp_path_factory.mktemp("labelled") / "sentiment.tsv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def ctx(tokenizer):
    return Context(tokenizer=tokenizer, quiet=True)


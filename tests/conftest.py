"""Shared test setup. TRITON_INTERPRET must be set before any Triton kernel is decorated, so it
is set here, at collection time, whenever no GPU is present."""

from __future__ import annotations

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never touch the user's spectra cache; each session gets its own.
os.environ.setdefault("COMPRESSOR_CACHE", tempfile.mkdtemp(prefix="compressor-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: on small tensors two threads are slower, and CI machines are shared.
torch.set_num_threads(1)

import pytest  # noqa: E402

from compressor.models import DEFAULT_MODEL_DIR  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stories_dir():
    """The real stories260K checkpoint shipped inside the package."""
    return DEFAULT_MODEL_DIR


@pytest.fixture
def stories():
    from compressor.models import load_model

    return load_model(None)


@pytest.fixture
def tokenizer():
    from compressor.models import default_tokenizer

    return default_tokenizer()

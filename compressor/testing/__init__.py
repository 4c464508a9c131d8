"""Test helpers: tiny models built in code (no downloads) and numerics checks."""

from .tiny import tiny_bert, tiny_gpt2, tiny_llama  # noqa: F401

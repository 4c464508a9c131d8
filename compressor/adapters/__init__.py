"""compressor.adapters — explicit imports register each method."""

from . import dsee, kappatune, lora, nola, welore_tune  # noqa: F401

"""compressor.adapters — explicit imports register each method."""

from . import dsee, heal, kappatune, lora, nola, welore_tune  # noqa: F401

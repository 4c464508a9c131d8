"""compressor.adapters — explicit imports register each method."""
from . import nola  # noqa: F401

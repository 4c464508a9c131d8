"""Read-only analysis: spectra (pure maths), the spectra cache, and the `analyze` stage."""

from . import analyze, spectra  # noqa: F401
from .analyze import AnalyzeConfig, layer_spectra  # noqa: F401

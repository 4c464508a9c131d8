"""Errors of `compressor.kernels` (here, so the kernels import nothing from the library)."""

from __future__ import annotations

INSTALL_HINT = "pip install 'compressor[kernels]'"


class KernelUnavailable(RuntimeError):
    """A requested kernel backend cannot run here (Triton missing, or no device for it)."""

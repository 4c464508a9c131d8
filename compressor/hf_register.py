"""Registers compressor's quantizer with transformers, lazily.

Importing `transformers.quantizers` costs seconds, so `import compressor` only installs an import
hook; the quantizer (`hf_quantizer`) registers itself right after transformers imports
`transformers.quantizers.auto` (which `from_pretrained` always does), or at once if it already
has. Nothing here imports torch, transformers, the method registry or peft.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

from .ckpt_format import QUANT_METHOD

_HOOKED_MODULE = "transformers.quantizers.auto"


def install() -> None:
    """Register the quantizer now if transformers' quantizer table is loaded, else on its import."""
    module = sys.modules.get(_HOOKED_MODULE)
    if module is not None:
        _register(module)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register(auto_module) -> None:
    if QUANT_METHOD in auto_module.AUTO_QUANTIZER_MAPPING:
        return
    from .hf_quantizer import CompressorConfig, CompressorQuantizer

    auto_module.register_quantization_config(QUANT_METHOD)(CompressorConfig)
    auto_module.register_quantizer(QUANT_METHOD)(CompressorQuantizer)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of transformers.quantizers.auto so that the
    quantizer registers right after that module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec

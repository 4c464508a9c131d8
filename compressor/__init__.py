"""compressor: analyse, compress and parameter-efficiently fine-tune transformer checkpoints.

Python API::

    import compressor
    model = compressor.load("o/")                       # any MODEL the CLI accepts
    pipe = compressor.Pipeline.from_file("recipes/saes-svd.yaml", ["out=o/"])
    report, loaded = pipe.run()

The public names are imported on first use (PEP 562), so `import compressor` — and with it every
`compressor --help` — does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

from . import hf_register as _hf_register
from ._version import __version__ as __version__

# transformers' from_pretrained reads compressed checkpoints once compressor is imported. Cheaply:
# an import hook registers the quantizer when transformers loads its quantizer table (hf_register).
_hf_register.install()

# public name -> the module that defines it
_PUBLIC = {
    "MethodConfig": ".config",
    "CompressorError": ".errors", "ConfigError": ".errors", "DataError": ".errors", "GateError": ".errors",
    "ModelError": ".errors", "OutputError": ".errors",
    "load": ".models", "load_model": ".models", "save": ".models",
    "Pipeline": ".pipeline",
    "apply_": ".registry", "get_method": ".registry", "method_names": ".registry", "register": ".registry",
    "Report": ".report", "StageResult": ".report",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])

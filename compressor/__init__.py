"""compressor: analyse, compress and parameter-efficiently fine-tune transformer checkpoints.

Python API::

    import compressor
    model = compressor.load("o/")                       # any MODEL the CLI accepts
    pipe = compressor.Pipeline.from_file("recipes/saes-svd.yaml")
    report, loaded = pipe.run()
"""

from .config import MethodConfig
from .errors import CompressorError, ConfigError, DataError, GateError, ModelError, OutputError
from .models import load, load_model, save
from .pipeline import Pipeline
from .registry import apply_, get_method, method_names, register
from .report import Report, StageResult

__version__ = "0.1.0"

__all__ = [
    "CompressorError", "ConfigError", "DataError", "GateError", "MethodConfig", "ModelError", "OutputError",
    "Pipeline", "Report", "StageResult", "apply_", "get_method", "load", "load_model", "method_names",
    "register", "save",
]

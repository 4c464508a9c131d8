"""Fine-tuning: the shared trainer (`fit`, `TrainConfig`) and the `backprop`, `mezo` and `sorted` stages.

The stages register when the registry imports their modules by name (their configs' `apply=`); this
package imports none of them, so the adapters can build on `fit` without a cycle.
"""

from compressor.training.config import TrainConfig
from compressor.training.trainer import TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "fit"]

"""Fine-tuning: the shared trainer (`fit`, `TrainConfig`) and the `backprop`, `mezo` and `sorted` stages."""

from compressor.training import mezo, sorted_ft, trainer  # noqa: F401  (explicit imports register the stages)
from compressor.training.config import TrainConfig
from compressor.training.trainer import TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "fit"]

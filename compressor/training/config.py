"""`TrainConfig` where the training code has always imported it from; it is declared, torch-free,
in compressor/configs/train.py."""

from __future__ import annotations

from compressor.configs.train import (  # noqa: F401  (re-exported)
    DEFAULT_LR,
    MAX_STEPS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TASKS,
    TrainConfig,
)

"""maestro: trainable low-rank factors with ordered dropout; learned ranks, truncatable to any budget.

Its config (see compressor/configs/__init__.py); the method is compressor/methods/maestro.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import CalibrationConfig
from ..errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class MaestroConfig(CalibrationConfig, calibration=None, num_windows=32, batch_size=4,
                    method="maestro", kind="compress", apply="compressor.methods.maestro"):
    """Args:
    rank: final KEEP ratio of the targeted linears' parameters, reached by truncating every
        layer in importance order; None = keep the learned ranks (train without it if you want
        to truncate the run to several budgets later).
    from_trained: folder of a previous maestro run (its checkpoint); skip training and truncate
        its ordered factors to `rank`.
    init: "svd" (data-free) or "whitened" (SVD of W L, H = X X^T from calibration windows).
    init_rank: fraction of min(out, in) the factors start with (1.0 = full rank, exact).
    importance: how rank importance ||v_i:||_h * ||u_:i||_h measures v's rows: "output" (with
        `init: whitened`, in the calibration metric ||v_i L||, H = L Lᵀ, so importance follows
        the output energy each rank carries) or "factors" (plain norms, Maestro's rule; always
        used with `init: svd`, where both coincide up to the data's anisotropy).
    epochs: passes over the training windows; progressive shrinking runs after each.
    train_windows: training windows per epoch.
    batch_size: windows per step (training and calibration).
    seq_len: tokens per window.
    lr: learning rate.
    optimizer: "sgd" (momentum, Maestro's default) or "adamw".
    momentum: SGD momentum.
    weight_decay: weight decay of the factors.
    gp_lambda: weight of the hierarchical group lasso (Maestro default 5e-3).
    threshold: importance below which a rank is cut after each epoch (Maestro default 1e-5).
    full_pass: distil the truncated pass from the full pass (Maestro's default); false = the
        truncated pass trains on the labels alone (one forward per step instead of two).
    data: training text (its `train` split) and held-out text (its `eval` split).
    calibration: text for `init: whitened` (None = `data`).
    num_windows: calibration windows for `init: whitened`.
    eval_windows: held-out windows for the perplexity curve; 0 = no curve.
    curve_keeps: keep ratios at which the accuracy-size curve is measured.
    """

    rank: float | None = None
    from_trained: str | None = None
    init: Literal["svd", "whitened"] = "svd"
    init_rank: float = 1.0
    importance: Literal["output", "factors"] = "output"
    epochs: int = 1
    train_windows: int = 64
    lr: float = 1e-3
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gp_lambda: float = 5e-3
    threshold: float = 1e-5
    full_pass: bool = True
    data: str = "default"
    eval_windows: int = 16
    curve_keeps: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and not 0 < self.rank <= 1:
            raise ConfigError(
                f"maestro: `rank` is the keep ratio of parameters and must be in (0, 1], got "
                f"{self.rank!r}; e.g. `rank: 0.5`, or leave it unset to keep the learned ranks"
            )
        if self.from_trained is not None and self.rank is None:
            raise ConfigError(
                f"maestro: `from_trained`={self.from_trained!r} truncates a trained run to a budget, "
                "so `rank` is required; e.g. `--rank 0.5`"
            )
        if not 0 < self.init_rank <= 1:
            raise ConfigError(
                f"maestro: `init_rank` must be in (0, 1], got {self.init_rank!r}; 1.0 starts exact"
            )
        for key in ("epochs", "train_windows"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if key == "epochs" else 1)
            ):
                raise ConfigError(f"maestro: `{key}` must be a positive integer, got {value!r}")
        if (
            isinstance(self.eval_windows, bool)
            or not isinstance(self.eval_windows, int)
            or self.eval_windows < 0
        ):
            raise ConfigError(
                f"maestro: `eval_windows` must be an integer >= 0 (0 = no curve), got {self.eval_windows!r}"
            )
        for key in ("lr", "gp_lambda", "threshold", "weight_decay", "momentum"):
            value = getattr(self, key)
            if value < 0 or (key == "lr" and value == 0):
                raise ConfigError(
                    f"maestro: `{key}` must be {'> 0' if key == 'lr' else '>= 0'}, got {value!r}"
                )
        if not all(0 < k <= 1 for k in self.curve_keeps):
            raise ConfigError(
                f"maestro: `curve_keeps` must be keep ratios in (0, 1], got {list(self.curve_keeps)}"
            )

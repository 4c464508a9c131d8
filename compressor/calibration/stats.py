"""Per-linear input statistics, accumulated batch by batch while a block replays.

One class for every calibrated method; the kind says what is accumulated:

| kind            | accumulates                          | read with                              | used by                      |
|-----------------|--------------------------------------|----------------------------------------|------------------------------|
| `abs_mean`      | Σ |x_j|                              | `abs_mean()`                           | asvd                         |
| `sq_norm`       | Σ x_j²                               | `mean_square()`                        | prune (wanda)                |
| `hessian`       | Σ x xᵀ                               | `hessian()` (symmetrised), `second_moment()` (as summed) | svd-llm, aware allocation; prune (sparsegpt), dsformer, maestro |
| `hessian+cross` | Σ x xᵀ and Σ x_f xᵀ (x_f: teacher)   | also `teacher_cross()`                 | saes-svd, svd-llm's update   |

Each batch product is computed in fp32 (the heavy matmul) and summed across batches in fp64 so
long calibration runs do not lose precision. Linears that read the very same tensor (q/k/v,
gate/up) share one LayerStats (StatsCollector detects them on the first batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ModelError

STATS_KINDS = ("abs_mean", "sq_norm", "hessian", "hessian+cross")


@dataclass
class LayerStats:
    """Calibration statistics of one linear's inputs (n features), accumulated batch by batch.

    tokens: N seen so far. abs_sum (n,): Σ|x_j|. sq_sum (n,): Σ x_j². gram (n, n): Σ x xᵀ = X Xᵀ.
    cross (n, n): Σ x_f xᵀ = X_f Xᵀ with x_f the teacher's (full-precision model's) input for the
    same token.
    """

    kind: str
    tokens: int = 0
    abs_sum: Tensor | None = None
    sq_sum: Tensor | None = None
    gram: Tensor | None = None
    cross: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in STATS_KINDS:
            raise ValueError(f"unknown statistics kind {self.kind!r}; one of {', '.join(STATS_KINDS)}")

    def add(self, x: Tensor, x_teacher: Tensor | None = None) -> None:
        """x, x_teacher: (tokens, n) fp32 inputs of the compressed model and of the teacher."""
        x = x.float()
        self.tokens += x.shape[0]
        if self.kind == "abs_mean":
            self.abs_sum = _acc(self.abs_sum, x.abs().sum(0))
            return
        if self.kind == "sq_norm":
            self.sq_sum = _acc(self.sq_sum, x.square().sum(0))
            return
        self.gram = _acc(self.gram, x.T @ x)
        if self.kind == "hessian+cross":
            if x_teacher is None or x_teacher.shape != x.shape:
                raise ModelError(
                    "internal: teacher activations missing or misaligned with the student's"
                )
            self.cross = _acc(self.cross, x_teacher.float().T @ x)

    def abs_mean(self) -> Tensor:
        """mean_tokens |x_j| (n,), fp64."""
        return self.abs_sum / max(self.tokens, 1)

    def mean_square(self) -> Tensor:
        """mean_tokens x_j² = ‖X_j‖²/N (n,), fp64."""
        return self.sq_sum / max(self.tokens, 1)

    def second_moment(self) -> Tensor:
        """X Xᵀ / N (n, n), fp64, as summed (each fp32 batch product need not be exactly symmetric)."""
        return self.gram / max(self.tokens, 1)

    def hessian(self) -> Tensor:
        """H = X Xᵀ / N (n, n), fp64, exactly symmetrised."""
        h = self.second_moment()
        return (h + h.T) / 2

    def teacher_cross(self) -> Tensor:
        """X_f Xᵀ / N (n, n), fp64."""
        return self.cross / max(self.tokens, 1)

    def to(self, device: torch.device | str) -> LayerStats:
        """The same statistics on `device` (factorisation may run elsewhere than calibration)."""
        moved = {name: None if t is None else t.to(device) for name, t in self._tensors().items()}
        return LayerStats(self.kind, self.tokens, **moved)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values() if t is not None)

    def _tensors(self) -> dict[str, Tensor | None]:
        return {"abs_sum": self.abs_sum, "sq_sum": self.sq_sum, "gram": self.gram, "cross": self.cross}


def _acc(total: Tensor | None, batch: Tensor) -> Tensor:
    batch = batch.double()
    return batch if total is None else total.add_(batch)


class StatsCollector:
    """Routes hooked inputs into LayerStats; on the first batch it detects linears that read the
    very same tensor (q/k/v, gate/up) and lets them share one accumulator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.stats: dict[str, LayerStats] = {}
        self.alias: dict[str, str] = {}
        self.teacher_x: dict[str, Tensor] = {}
        self.seen: list[tuple[str, Tensor]] | None = None

    def start_batch(self, first: bool) -> None:
        self.teacher_x = {}
        self.seen = [] if first else None

    def add(self, name: str, x: Tensor) -> None:
        if self.seen is not None:
            leader = next(
                (n for n, y in self.seen if y.shape == x.shape and torch.equal(y, x)), None
            )
            if leader is not None:
                self.alias[name] = leader
                return
            self.seen.append((name, x))
            self.stats[name] = LayerStats(self.kind)
        if name not in self.alias:
            self.stats[name].add(x, self.teacher_x.get(name))

    def result(self) -> dict[str, LayerStats]:
        return {**self.stats, **{name: self.stats[leader] for name, leader in self.alias.items()}}

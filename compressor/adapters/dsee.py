"""DSEE: dually sparsity-embedded efficient tuning (Chen et al., ACL 2023, arXiv 2111.00160;
reference code VITA-Group/DSEE).

Two sparsities:

1. The update is low-rank plus sparse, W = W₀ + (α/r)(B A + S₂). B A is a LoRA and S₂ has a
   fixed support Ω of `num_sparse` entries per matrix, chosen before training from a GreBsmo
   low-rank + sparse decomposition of the *pretrained* W₀ ≈ U V + S (Ω = top-N |S|). Only the N
   values on Ω are parameters, and Ω is stored as two index buffers, so training cannot touch
   any other entry. Applied to the query and value projections by default.
2. The final weights are sparse: after tuning, the merged weights W₀ + ΔW are scored by magnitude
   (global L1 over every `prune_targets` linear, or N:M per row), W₀ is masked under that score
   (the update stays unmerged), and LoRA + S₂ are re-tuned for `retune_steps` on the pruned
   backbone. FLOPs are counted on non-zero weights (what a sparse kernel executes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..context import Context
from ..errors import ConfigError
from ..layers import CompressedLinear, register_layer
from ..methods.prune import magnitude_scores, prune_mask, unstructured_mask
from ..registry import register
from ..report.records import StageResult
from ..targeting import linear_shape, linear_weight, replace_module, select_linears
from ..training import TrainConfig, fit
from ._common import base_weight, count_params, param_metrics, refuse_quantized, run_seed, with_default_lr

DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value")  # Llama/Mistral/Qwen and BERT names


@dataclass(frozen=True, kw_only=True)
class DseeConfig(TrainConfig):
    """Args (plus every `TrainConfig` field):
        targets: linears that get LoRA + S₂; default the query and value projections.
        rank: LoRA rank r (DSEE scripts: 16).
        alpha: LoRA alpha; the update (B A + S₂) is scaled by alpha / rank.
        num_sparse: N, entries of S₂ per adapted matrix (DSEE: 64 for SST-2, 16 for RTE).
        sparse_method: how Ω is chosen: "grebsmo" (top-N |S| of W₀ ≈ U V + S, the paper's),
            "magnitude" (top-N |W₀|, the code's `omp`) or "random" (the code's `rp`).
        grebsmo_iterations: outer GreBsmo iterations; the rank grows after each (DSEE: 100).
        grebsmo_inner: alternations U, V, S per outer iteration (METHODS: 2).
        grebsmo_rank_step: rows appended to V after each outer iteration (METHODS: 5).
        grebsmo_threshold: S keeps entries of W − U V with |·| >= this (DSEE: 0.01, absolute).
        grebsmo_max_rank: the rank of U V stops growing at this fraction of min(out, in). DSEE's
            100 × 5 rows reach rank 501 of BERT-base's 768; on small matrices the rank would reach
            full, where S vanishes and Ω would be arbitrary.
        prune: "unstructured" (global magnitude over all `prune_targets`), "N:M" such as "2:4"
            (per row along in_features), or "none".
        prune_ratio: fraction of the `prune_targets` weights removed by "unstructured" (DSEE: 0.5).
        prune_targets: linears whose weights are pruned; empty = every linear but lm_head and
            embeddings (DSEE prunes all q, k, v and dense weights of the encoder).
        retune_steps: training steps after pruning; None = `steps`.
        merge: after re-tuning, fold B A and S₂ into dense nn.Linear weights (outputs unchanged;
            the pruning zeros are then filled by ΔW, so keep it off to keep the FLOP savings).
        lr: None = 2e-4 with adamw (DSEE's SST-2 rate), 5e-5 with mezo.
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 16
    alpha: float = 32.0
    num_sparse: int = 64
    sparse_method: str = "grebsmo"
    grebsmo_iterations: int = 100
    grebsmo_inner: int = 2
    grebsmo_rank_step: int = 5
    grebsmo_threshold: float = 0.01
    grebsmo_max_rank: float = 0.5
    prune: str = "unstructured"
    prune_ratio: float = 0.5
    prune_targets: tuple[str, ...] = ()
    retune_steps: int | None = None
    merge: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("rank", "num_sparse", "grebsmo_iterations", "grebsmo_inner", "grebsmo_rank_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dsee: `{key}` must be an integer >= 1, got {value!r}")
        if self.sparse_method not in ("grebsmo", "magnitude", "random"):
            raise ConfigError(f"dsee: `sparse_method` must be 'grebsmo', 'magnitude' or 'random', got "
                              f"{self.sparse_method!r}")
        if not 0 < self.grebsmo_max_rank <= 1:
            raise ConfigError(f"dsee: `grebsmo_max_rank` is a fraction of min(out, in) in (0, 1], got "
                              f"{self.grebsmo_max_rank}")
        if not _valid_prune(self.prune):
            raise ConfigError(f"dsee: `prune` must be 'unstructured', 'none' or 'N:M' with 0 < N < M such as "
                              f"'2:4', got {self.prune!r}")
        if not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"dsee: `prune_ratio` is the fraction of weights removed, in [0, 1), got "
                              f"{self.prune_ratio}; DSEE uses 0.5")
        if self.retune_steps is not None and (isinstance(self.retune_steps, bool) or self.retune_steps < 0):
            raise ConfigError(f"dsee: `retune_steps` must be an integer >= 0, got {self.retune_steps!r}")
        if not self.alpha > 0:
            raise ConfigError(f"dsee: `alpha` must be > 0, got {self.alpha}")


def _valid_prune(prune: str) -> bool:
    if prune in ("none", "unstructured"):
        return True
    parts = prune.split(":")
    return len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1])


# -- pure numerics: Ω from GreBsmo ---------------------------------------------------------------


def hard_threshold(x: Tensor, threshold: float) -> Tensor:
    """x with every entry of |x| < threshold set to 0."""
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def grebsmo(weight: Tensor, *, iterations: int = 100, inner: int = 2, threshold: float = 0.01,
            rank_step: int = 5, max_rank: int | None = None, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy low-rank + sparse split W ≈ U V + S, as DSEE's run_glue.py runs it.

    weight (m, n) -> U (m, r) with orthonormal columns, V (r, n), S (m, n) hard-thresholded.
    Starts from a random rank-1 V; each outer iteration alternates U ← Q(QR((W − S)Vᵀ)),
    V ← Uᵀ(W − S), S ← hard-threshold(W − U V) `inner` times, then appends the first `rank_step`
    rows of R from the QR of the residual W − U V − S to V (until `max_rank`).
    """
    w = weight.detach().float()
    m, n = w.shape
    max_rank = min(max_rank or min(m, n), min(m, n))
    v = torch.randn(1, n, generator=torch.Generator().manual_seed(seed)).to(w.device)
    s = torch.zeros_like(w)
    u = torch.zeros(m, 1, device=w.device)
    for _ in range(iterations):
        for _ in range(inner):
            u = torch.linalg.qr((w - s) @ v.T).Q  # (m, r)
            v = u.T @ (w - s)  # (r, n)
            s = hard_threshold(w - u @ v, threshold)
        if v.shape[0] < max_rank:
            residual = w - u @ v - s
            grow = torch.linalg.qr(residual).R[:rank_step]  # (<= rank_step, n)
            v = torch.cat([v, grow[: max_rank - v.shape[0]]])
    return u, v, s


def top_support(scores: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) int64 of the `num` largest |scores| entries, in row-major order."""
    flat = scores.detach().abs().reshape(-1)
    chosen = flat.topk(min(num, flat.numel())).indices.sort().values
    return chosen // scores.shape[1], chosen % scores.shape[1]


def random_support(shape: tuple[int, int], num: int, seed: int) -> tuple[Tensor, Tensor]:
    chosen = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(seed))[:num].sort().values
    return chosen // shape[1], chosen % shape[1]


def sparse_dense(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """S₂ (out, in) from COO; duplicate coordinates add (the kernels' convention)."""
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return dense.index_put((rows, cols), values, accumulate=True)


def global_magnitude_masks(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Keep-masks removing the `ratio` smallest scores over all matrices together (global L1)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = unstructured_mask(flat[None, :], ratio).reshape(-1)
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def layer_flops(out_features: int, in_features: int, nonzero: int, adapter: tuple[int, int] = (0, 0)) -> int:
    """Multiply-adds × 2 per token: base matmul on `nonzero` weights + LoRA r(m+n) + S₂ N."""
    rank, num_sparse = adapter
    return 2 * (nonzero + rank * (out_features + in_features) + num_sparse)


# -- the layer ---------------------------------------------------------------------------------


@register_layer
class DseeLinear(CompressedLinear):
    """y = x W₀ᵀ + b + (α/r)·[(x Aᵀ) Bᵀ + x S₂ᵀ], S₂ given by Ω (two int64 buffers) and N values.

    W₀ is frozen (and holds the pruning zeros); A (r, in), B (out, r) and the N values train.
    """

    layer_type = "dsee"

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, num_sparse: int,
                 bias: bool = False, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__(in_features, out_features)
        self.rank, self.alpha, self.num_sparse = rank, float(alpha), num_sparse
        kw = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.delta_values = nn.Parameter(torch.zeros(num_sparse, **kw))
        self.register_buffer("delta_rows", torch.zeros(num_sparse, dtype=torch.int64, device=device))
        self.register_buffer("delta_cols", torch.zeros(num_sparse, dtype=torch.int64, device=device))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, module: nn.Module, support: tuple[Tensor, Tensor], *, rank: int, alpha: float,
                    seed: int) -> DseeLinear:
        """Wrap a linear: W₀ copied, A Kaiming-uniform (seeded), B = 0, S₂ = 0 on `support`."""
        out_f, in_f = linear_shape(module)
        bias = getattr(module, "bias", None)
        weight = linear_weight(module)
        layer = cls(in_f, out_f, rank, alpha, len(support[0]), bias is not None, weight.dtype, weight.device)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / in_f**0.5  # nn.Linear's kaiming_uniform_(a=√5), as peft initialises lora_A
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            layer.lora_a.copy_(torch.empty(rank, in_f).uniform_(-bound, bound, generator=generator))
            layer.delta_rows.copy_(support[0])
            layer.delta_cols.copy_(support[1])
        return layer

    def init_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "alpha": self.alpha, "num_sparse": self.num_sparse, "bias": self.bias is not None}

    def sparse_delta(self) -> Tensor:
        """S₂ (out, in), unscaled."""
        return sparse_dense(self.delta_rows, self.delta_cols, self.delta_values, (self.out_features, self.in_features))

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_b @ self.lora_a + self.sparse_delta())

    def dense_weight(self) -> Tensor:
        return self.weight + self.delta_weight()

    def forward(self, x: Tensor) -> Tensor:
        return kernels.dsee_linear(x, self.weight, self.lora_a, self.lora_b, self.scaling, self.delta_rows,
                                   self.delta_cols, self.scaling * self.delta_values, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"num_sparse={self.num_sparse}")

"""DSEE: dually sparsity-embedded efficient tuning (Chen et al., ACL 2023, arXiv 2111.00160;
reference code VITA-Group/DSEE).

Its config (see compressor/configs/__init__.py); the method is compressor/adapters/dsee.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .train import TrainConfig

DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value")  # Llama/Mistral/Qwen and BERT names
POSITIVE_INTS = ("r", "num_sparse", "grebsmo_iterations", "grebsmo_inner", "grebsmo_rank_step")


@dataclass(frozen=True, kw_only=True)
class DseeConfig(TrainConfig, method="dsee", kind="finetune", apply="compressor.adapters.dsee"):
    """Args (plus every `TrainConfig` field):
    targets: linears that get LoRA + S₂; default the query and value projections.
    r: LoRA rank (peft's name; DSEE scripts: 16).
    alpha: LoRA alpha; the update (B A + S₂) is scaled by alpha / r.
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
        ΔW then fills the pruning zeros, so the FLOP savings are gone: keep it off for them).
    lr: None = 2e-4 with adamw (DSEE's SST-2 rate), 5e-5 with mezo.
    """

    targets: tuple[str, ...] = DEFAULT_TARGETS
    renamed: ClassVar[dict[str, str]] = {"rank": "r (peft's name for the adapter rank)"}

    r: int = 16
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
        for key in POSITIVE_INTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dsee: `{key}` must be an integer >= 1, got {value!r}")
        if self.sparse_method not in ("grebsmo", "magnitude", "random"):
            raise ConfigError(f"dsee: `sparse_method` must be 'grebsmo', 'magnitude' or 'random', "
                              f"got {self.sparse_method!r}")
        if not 0 < self.grebsmo_max_rank <= 1:
            raise ConfigError(f"dsee: `grebsmo_max_rank` is a fraction of min(out, in) in (0, 1], "
                              f"got {self.grebsmo_max_rank}")
        if not _valid_prune(self.prune):
            raise ConfigError(f"dsee: `prune` must be 'unstructured', 'none' or 'N:M' with "
                              f"0 < N < M such as '2:4', got {self.prune!r}")
        if not 0 <= self.prune_ratio < 1:
            raise ConfigError(f"dsee: `prune_ratio` is the fraction of weights removed, in "
                              f"[0, 1), got {self.prune_ratio}; DSEE uses 0.5")
        retune = self.retune_steps
        if retune is not None and (isinstance(retune, bool) or retune < 0):
            raise ConfigError(f"dsee: `retune_steps` must be an integer >= 0, got {retune!r}")
        if not self.alpha > 0:
            raise ConfigError(f"dsee: `alpha` must be > 0, got {self.alpha}")


def _valid_prune(prune: str) -> bool:
    if prune in ("none", "unstructured"):
        return True
    parts = prune.split(":")
    return len(parts) == 2 and all(p.isdigit() for p in parts) and 0 < int(parts[0]) < int(parts[1])

"""The training-free low-rank family (svd, asvd, svd-llm, saes-svd, welore): its shared configs,
declared torch-free in compressor/configs/lowrank.py and re-exported here; the driver that plans,
factors and installs is _lowrank_driver.py, the factor maths _factors.py.

`rank` is always a KEEP ratio of parameters (METHODS §13.1: every SVD codebase mixes keep and
remove up): a targeted (m, n) linear gets r = ⌊rank·m·n/(m+n)⌋ so its factors U (m, r) and
V (r, n) hold about `rank`·m·n numbers. A layer stays dense when factoring it would not save
parameters (r ≥ min(m, n) or r·(m+n) ≥ m·n) and whenever `rank` = 1, so rank 1 is the identity.

Calibrated methods run sequentially, one transformer block at a time (compressor.calibration):
capture the block's inputs, hook the block's targeted linears to accumulate statistics, compress,
then feed the COMPRESSED block's outputs to the next block, so every layer sees the error its
upstream compression introduced. Inside a block the linears are compressed in two phases — the
ones reading the block input (q, k, v, gate, up) first, then the ones in `second_phase` (o, down)
— so the second phase is calibrated on the compressed first phase's outputs. Methods that need the
full-precision "teacher" inputs X_f as well (saes-svd, the svd-llm update) stream a copy of the
original block in parallel. Peak memory is one block's inputs (student and teacher), one batch of
hooked activations and the statistics of one block's linears; weights may stay on the CPU while
each block is moved to `ctx.device` for its calibration passes.
"""

from __future__ import annotations

from ..calibration import (  # noqa: F401  (LayerStats, split_phases re-exported for tests)
    LayerStats,
    split_phases,
)
from ..configs.lowrank import (  # noqa: F401  (the config, declared there; re-exported)
    AWARE_GROUPS,
    AWARE_LOSSES,
    Allocation,
    CalibratedLowRankConfig,
    LowRankConfig,
)
from ._factors import check_finite, split_singular  # noqa: F401  (re-exported for tests and benchmarks)
from ._lowrank_plan import (  # noqa: F401  (re-exported for tests and benchmarks)
    LayerPlan,
    LayerStatus,
    factoring_saves,
    keep_ratio_reached,
    plan_layer,
    plan_uniform,
    uniform_rank,
    welore_plan,
)

"""`heal`: train only the compressed parameters of a compressed model, after compression.

What trains (everything else — embeddings, norms, lm_head, dense layers — stays frozen):
  * low-rank layers (svd, asvd, svd-llm, saes-svd, welore, `LowRankLinear`): the factors U, V;
  * N:M layers (`prune` pattern n:m, `NMSparseLinear`): the packed values; the positions are a
    buffer, so the mask cannot move and the N:M structure stays exact;
  * dense×sparse layers (`dsformer`, `DenseSparseLinear`): D and the packed values of S (its
    positions fixed likewise);
  * with `pruned_linears` (default on), plain linears whose weight is at least 20 % exact zeros
    (unstructured `prune` output): the non-zeros only — the gradient is masked, so AdamW's update
    of a zero entry is exactly 0 and pruned positions stay exactly zero;
  * biases of those layers with `train_bias`;
  * with `lora_r: r > 0`, also a LoRA pair (A (r, in) Kaiming-uniform, B (out, r) zeros, y += x Aᵀ Bᵀ)
    on every healed low-rank layer and on every dense linear left inside the model (lm_head and
    embeddings excluded), trained with the rest and merged when training ends: into a low-rank
    layer by concatenating the factors, U' = [U | B], V' = [V ; A] (exact; its rank grows by r,
    so it stores r·(m+n) more values), into a dense linear by W' = W + B·A (same size). N:M,
    dense×sparse and pruned layers get no LoRA (B·A would fill in their zeros); their values train
    as above.

Loss: `lm` (next-token cross entropy on `data`) or `kl` (distillation: the KL divergence from the
dense teacher's next-token distribution, temperature `temperature`). The teacher runs alongside the
student on every batch (no logit cache, exact, one extra forward): `teacher: source` reloads the
model the run started from (in a recipe compress → heal, the dense input), or give a model path
/ id. A teacher that itself holds compressed layers is refused. Training goes through the shared
trainer (`compressor.training.fit`): checkpoints, `resume`, the memory meter and MeZO all apply.

`welore-tune` (WeLore's LRC tuning, compressor/adapters/welore_tune.py) is this stage restricted
to low-rank layers with WeLore's defaults.
"""

from __future__ import annotations

from torch import nn

from ..configs.heal import HealConfig  # noqa: F401  (the config, declared there; re-exported)
from ..context import Context
from ..registry import register
from ..report.records import StageResult
from ._heal_train import heal


@register(HealConfig)
def apply(model: nn.Module, config: HealConfig, ctx: Context) -> StageResult:
    """Train only the compressed parameters (factors, packed sparse values) of a compressed model."""
    return heal(model, config, ctx)

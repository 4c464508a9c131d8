"""dsformer's STF and maestro's epochs run through `fit`: their curves keep one value per step
(and maestro one rank total per epoch), the frozen weights stay frozen, and a diverging run
still ends in the method's own one-line error."""

from __future__ import annotations

import pytest
import torch

from compressor.context import Context
from compressor.errors import ModelError
from compressor.methods import dsformer, maestro
from compressor.testing import tiny_llama

MAESTRO = {"init": "svd", "epochs": 2, "train_windows": 7, "batch_size": 3, "seq_len": 16,
           "eval_windows": 0, "threshold": 0.05}
DSFORMER = {"keep_bytes": 0.7, "init": "plain", "seq_len": 16, "batch_size": 2, "stf_steps": 3, "eval_windows": 0}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "embed" in n or "norm" in n}


def test_maestro_trains_every_window_per_epoch_and_shrinks_after_each(tokenizer):
    model = tiny_llama()
    before = frozen(model)
    result = maestro.apply(model, maestro.MaestroConfig(**MAESTRO), Context(tokenizer=tokenizer, quiet=True))
    per_epoch = 3  # 7 windows in batches of 3: 3, 3 and 1
    assert len(result.curves["train_loss"]) == len(result.curves["group_lasso"]) == 2 * per_epoch
    assert len(result.curves["total_rank"]) == 2
    assert result.curves["total_rank"][1] <= result.curves["total_rank"][0]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after training
    assert not model.training


def test_a_diverging_maestro_run_names_its_epoch(tokenizer):
    config = maestro.MaestroConfig(**{**MAESTRO, "lr": 1e30, "optimizer": "adamw"})
    with pytest.raises(ModelError, match=r"maestro: training loss became non-finite at epoch \d; lower `lr`"):
        maestro.apply(tiny_llama(), config, Context(tokenizer=tokenizer, quiet=True))


def test_stf_records_one_loss_and_support_change_per_step(tokenizer):
    model = tiny_llama()
    before = frozen(model)
    result = dsformer.apply(model, dsformer.DSFormerConfig(**DSFORMER), Context(tokenizer=tokenizer, quiet=True))
    assert len(result.curves["stf_loss"]) == len(result.curves["stf_support_change"]) == 3
    assert all(0.0 <= v <= 1.0 for v in result.curves["stf_support_change"])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_a_diverging_stf_run_raises_the_dsformer_error(tokenizer):
    config = dsformer.DSFormerConfig(**{**DSFORMER, "lr": 1e30})
    with pytest.raises(ModelError, match=r"dsformer: STF loss became non-finite; lower `lr`"):
        dsformer.apply(tiny_llama(), config, Context(tokenizer=tokenizer, quiet=True))

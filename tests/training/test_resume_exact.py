"""Resume is exact or refused: trajectory fields must match, steps only grow, base weights by content."""

from __future__ import annotations

import pytest
import torch

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.testing import tiny_llama
from compressor.training.backprop import BackpropConfig, apply
from compressor.training.mezo import MezoConfig
from compressor.training.mezo import apply as mezo_apply


@pytest.fixture
def trained(tokenizer, tuning_text, tmp_path):
    """A 4-step backprop run with a checkpoint at step 4, in tmp_path/run."""
    config = BackpropConfig(steps=4, lr=1e-3, batch_size=2, seq_len=16, num_eval=2, data=tuning_text,
                            checkpoint_every=2)
    apply(tiny_llama(), config, Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path / "run"))
    return config.replace(resume=str(tmp_path / "run"))


@pytest.mark.parametrize("change, field", [({"lr": 2e-3}, "lr"), ({"seed": 7}, "seed"),
                                           ({"batch_size": 3}, "batch_size"), ({"seq_len": 8}, "seq_len"),
                                           ({"weight_decay": 0.1}, "weight_decay")])
def test_a_changed_trajectory_field_is_refused_by_name(trained, tokenizer, change, field):
    with pytest.raises(ConfigError, match=rf"`resume`: `{field}` is .* was trained with"):
        apply(tiny_llama(), trained.replace(steps=6, **change), Context(tokenizer=tokenizer, quiet=True))


def test_other_data_is_refused(trained, tokenizer, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("other text. " * 400)
    with pytest.raises(ConfigError, match=r"`data` is"):
        apply(tiny_llama(), trained.replace(steps=6, data=str(other)), Context(tokenizer=tokenizer, quiet=True))


def test_steps_below_the_checkpoint_are_refused(trained, tokenizer):
    with pytest.raises(ConfigError, match=r"`steps` may only grow: pass --steps 4 or more"):
        apply(tiny_llama(), trained.replace(steps=2), Context(tokenizer=tokenizer, quiet=True))


def test_other_base_weights_of_the_same_architecture_are_refused(trained, tokenizer):
    with pytest.raises(ConfigError, match=r"`model`: .*other base weights"):
        apply(tiny_llama(seed=1), trained.replace(steps=6), Context(tokenizer=tokenizer, quiet=True))


def test_steps_may_not_change_under_a_decaying_schedule(tokenizer, tuning_text, tmp_path):
    config = BackpropConfig(steps=2, lr=1e-3, batch_size=2, seq_len=16, num_eval=2, data=tuning_text,
                            checkpoint_every=2, schedule="cosine")
    apply(tiny_llama(), config, Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path))
    with pytest.raises(ConfigError, match="schedule depends on it"):
        apply(tiny_llama(), config.replace(steps=4, resume=str(tmp_path)), Context(tokenizer=tokenizer, quiet=True))


def test_resumed_output_keeps_checkpoints_and_resumes_again_exactly(trained, tokenizer, tuning_text, tmp_path):
    second, third = tmp_path / "second", tmp_path / "third"
    apply(tiny_llama(), trained.replace(steps=6), Context(tokenizer=tokenizer, quiet=True, out_dir=second))
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["step-4", "step-6"]
    resumed = tiny_llama()
    apply(resumed, trained.replace(steps=8, resume=str(second)), Context(tokenizer=tokenizer, quiet=True, out_dir=third))
    straight = tiny_llama()
    apply(straight, trained.replace(steps=8, resume=None), Context(tokenizer=tokenizer, quiet=True))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_mezo_resume_refuses_another_lr(tokenizer, tuning_text, tmp_path):
    config = MezoConfig(steps=2, lr=1e-5, batch_size=2, seq_len=16, num_eval=2, data=tuning_text)
    mezo_apply(tiny_llama(), config, Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"`lr` is 2e-05 but"):
        mezo_apply(tiny_llama(), config.replace(steps=4, lr=2e-5, resume=str(tmp_path)),
                   Context(tokenizer=tokenizer, quiet=True))

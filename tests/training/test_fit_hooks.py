"""fit's hooks for methods with a loop of their own (dsformer's STF, maestro): windows in stored
order, the caller's optimizer, a callback after each update. Through them `fit` is exactly the
plain loop it replaces, bit for bit, and it still checkpoints and resumes."""

from __future__ import annotations

import pytest
import torch

from compressor.context import Context
from compressor.errors import ConfigError
from compressor.models import load_model
from compressor.offload import has_offloaded_weights, is_dispatched
from compressor.testing import tiny_llama
from compressor.training.config import TrainConfig
from compressor.training.data import in_order_windows
from compressor.training.losses import next_token_loss
from compressor.training.trainer import fit, no_evaluation

BATCH, STEPS = 3, 5


def windows(model) -> torch.Tensor:
    """7 windows: batches of 3, 3 and a last, shorter one of 1."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (7, 12), generator=generator)


def trained(model) -> list[torch.nn.Parameter]:
    layer = model.model.layers[0]
    return [layer.self_attn.q_proj.weight, layer.mlp.down_proj.weight]


def sgd(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-4)


def lm_loss(model, batch):
    return next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])


def plain_loop(model, tokens: torch.Tensor) -> tuple[list[float], list[torch.Tensor]]:
    """The loop maestro had: in-order batches (cycled), SGD, clip to 1, a snapshot after each step."""
    params = trained(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer, batches = sgd(params), tokens.split(BATCH)
    losses, snapshots = [], []
    model.train()
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        loss = next_token_loss(model(input_ids=batch).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        snapshots.append(params[0].detach().clone())
    return losses, snapshots


def through_fit(model, tokens, ctx, **overrides):
    snapshots, calls = [], []

    def after_step(done: int) -> None:
        calls.append(done)
        snapshots.append(trained(model)[0].detach().clone())

    config = TrainConfig(steps=STEPS, lr=0.5, batch_size=BATCH, seq_len=12, max_grad_norm=1.0, **overrides)
    result = fit(model, trained(model), config, ctx, loss_fn=lm_loss, eval_fn=no_evaluation,
                 data=in_order_windows(tokens), make_optimizer=sgd, after_step=after_step)
    return result, snapshots, calls


def test_in_order_windows_are_the_split_batches_cycled():
    tokens = windows(tiny_llama())
    data = in_order_windows(tokens)
    expected = list(tokens.split(BATCH))
    for index in range(7):
        assert torch.equal(data.train_batch(index, BATCH, seed=123)["input_ids"], expected[index % 3])


def test_fit_with_the_hooks_is_the_plain_loop_bit_for_bit(tokenizer):
    plain_model, fit_model = tiny_llama(), tiny_llama()
    losses, snapshots = plain_loop(plain_model, windows(plain_model))
    result, fit_snapshots, calls = through_fit(fit_model, windows(fit_model), Context(tokenizer=tokenizer, quiet=True))
    assert calls == list(range(1, STEPS + 1))  # after every update, with the finished-step count
    assert result.losses == losses
    assert all(torch.equal(a, b) for a, b in zip(snapshots, fit_snapshots, strict=True))
    for (name, a), b in zip(plain_model.named_parameters(), fit_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not snapshots[0].equal(snapshots[-1])  # it did train


def test_a_run_with_its_own_optimizer_resumes_exactly(tokenizer, tmp_path):
    """Momentum buffers of the caller's optimizer go into the checkpoint and come back."""
    first = tiny_llama()
    fit(first, trained(first), TrainConfig(steps=2, lr=0.5, batch_size=BATCH, seq_len=12, checkpoint_every=2),
        Context(tokenizer=tokenizer, quiet=True, out_dir=tmp_path / "run"), loss_fn=lm_loss,
        eval_fn=no_evaluation, data=in_order_windows(windows(first)), make_optimizer=sgd)
    resumed, straight = tiny_llama(), tiny_llama()
    through_fit(resumed, windows(resumed), Context(tokenizer=tokenizer, quiet=True),
                checkpoint_every=2, resume=str(tmp_path / "run"))
    through_fit(straight, windows(straight), Context(tokenizer=tokenizer, quiet=True), checkpoint_every=2)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_backprop_hooks_are_refused_with_mezo(tokenizer):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"`make_optimizer` and `after_step` apply to backprop"):
        fit(model, trained(model), TrainConfig(steps=1, optimizer="mezo"), Context(tokenizer=tokenizer, quiet=True),
            eval_fn=no_evaluation, data=in_order_windows(windows(model)), after_step=lambda done: None)


def test_fit_trains_inside_a_model_offloaded_by_accelerate_without_moving_it(tokenizer, tmp_path):
    """accelerate refuses `.to()` on an offloaded model: fit leaves placement to its hooks and
    feeds batches where the embeddings run, so a fresh (in-memory) layer inside it trains."""
    tiny_llama(layers=2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = load_model(tmp_path / "model", max_memory="cpu=20KB", offload_folder=tmp_path / "off").model
    assert is_dispatched(model) and next(model.parameters()).device.type == "meta"
    fresh = torch.nn.Linear(64, 32, bias=False)
    model.model.layers[0].mlp.down_proj = fresh
    start = fresh.weight.detach().clone()
    fit(model, [fresh.weight], TrainConfig(steps=2, lr=1e-2, batch_size=BATCH, seq_len=12),
        Context(tokenizer=tokenizer, quiet=True), loss_fn=lm_loss, eval_fn=no_evaluation,
        data=in_order_windows(windows(model)))
    assert not torch.equal(start, fresh.weight) and torch.isfinite(fresh.weight).all()
    assert has_offloaded_weights(model.model.layers[1].self_attn.q_proj)  # still offloaded

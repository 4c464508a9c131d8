"""Training losses and held-out evaluation for the three task shapes.

A loss function has the signature `loss_fn(model, batch) -> Tensor` (a scalar, mean over the
batch's predicted tokens or examples). It must not call `.backward()`: the trainer does, and MeZO
calls the same function under `torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.evaluation import perplexity
from compressor.training.data import HEAD_NAME, TaskData

LossFn = Callable[[nn.Module, dict], Tensor]


def next_token_loss(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Mean CE of predicting token t+1 from position t. logits (B, T, V), input_ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """Next-token CE of a causal LM; without autograd (MeZO, evaluation) the logits are formed
    a chunk at a time, so memory stays that of the hidden states rather than (B, T, vocab)."""
    input_ids = batch["input_ids"]
    if torch.is_grad_enabled() or not can_chunk_logits(model):
        return next_token_loss(model(input_ids=input_ids).logits, input_ids)
    return chunked_next_token_loss(model, input_ids)


# Logit elements per head call in the chunked loss: 2**24 fp32 = 64 MiB whatever the vocabulary.
CHUNK_LOGITS = 1 << 24


def can_chunk_logits(model: nn.Module) -> bool:
    """True when logits = lm_head(decoder output) exactly: a plain linear head, no soft-capping
    or logit scaling applied after it (those models take the full-logits path)."""
    config = getattr(model, "config", None)
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")) and isinstance(
        model.get_output_embeddings(), nn.Linear
    )


def chunked_next_token_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """`next_token_loss` computed from the decoder's hidden states, the head applied chunk by chunk."""
    hidden = model.get_decoder()(
        input_ids=input_ids, use_cache=False
    ).last_hidden_state  # (B, T, D)
    head = model.get_output_embeddings()
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D)
    targets = input_ids[:, 1:].reshape(-1).to(states.device)
    step = max(1, CHUNK_LOGITS // head.out_features)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), step):
        logits = head(states[start : start + step]).float()
        total = total + F.cross_entropy(logits, targets[start : start + step], reduction="sum")
    return total / len(targets)


def prompt_logits(model: nn.Module, batch: dict, label_token_ids: Tensor) -> Tensor:
    """(B, C) logits of the label words at each example's last prompt token (right padding)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(dim=1) - 1  # (B,)
    return logits[torch.arange(len(last), device=logits.device), last][
        :, label_token_ids.to(logits.device)
    ]


def head_logits(model: nn.Module, batch: dict) -> Tensor:
    """(B, C) logits of a sequence-classification model, or of the attached mean-pool head."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    head = getattr(model, HEAD_NAME, None)
    if head is None:
        return out.logits
    mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)  # (B, T, 1)
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, D)
    return head(pooled)


def class_logits_fn(data: TaskData) -> Callable[[nn.Module, dict], Tensor]:
    if data.label_token_ids is not None:
        return lambda model, batch: prompt_logits(model, batch, data.label_token_ids)
    return head_logits


def default_loss_fn(data: TaskData) -> LossFn:
    """The loss the task implies: next-token CE, or CE over class (label-word) logits."""
    if data.task == "lm":
        return lm_loss
    logits_fn = class_logits_fn(data)
    return lambda model, batch: F.cross_entropy(logits_fn(model, batch).float(), batch["labels"])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int, device) -> dict[str, float]:
    """Held-out metrics: lm -> eval_loss, perplexity; classification -> eval_loss, accuracy."""
    was_training = model.training
    if data.task != "classification":  # the one perplexity code path (compressor.evaluation)
        result = perplexity(model, data.eval["input_ids"], batch_size=batch_size)
        model.train(was_training)
        return {"eval_loss": result["nll"], "perplexity": result["perplexity"]}
    model.eval()
    total_loss, total_count, correct = 0.0, 0, 0
    logits_fn = class_logits_fn(data)
    for batch in data.eval_batches(batch_size):
        batch = to_device(batch, device)
        logits = logits_fn(model, batch).float()
        total_loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total_count += len(batch["labels"])
    model.train(was_training)
    return {"eval_loss": total_loss / max(total_count, 1), "accuracy": correct / max(total_count, 1)}

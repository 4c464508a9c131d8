"""Quality measurements: perplexity over non-overlapping windows (optionally at an early exit)
and embedding agreement for encoders.

One protocol everywhere (`PROTOCOL`): `compressor eval`, the before/after of compress / finetune /
run and the fine-tuning stages' own held-out perplexity all score the first `num_windows`
non-overlapping windows of `seq_len` tokens of the held-out half of the same text, through
`heldout_windows` and `perplexity`, so one model gets one number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .offload import input_device
from .protocol import PROTOCOL  # noqa: F401  (the protocol, defined in compressor/protocol.py)


def heldout_windows(tokenizer, data: str = "default", *, seq_len: int = PROTOCOL["seq_len"],
                    num_windows: int | None = PROTOCOL["num_windows"], text_column: str | None = None,
                    seed: int = 0) -> torch.Tensor:
    """The evaluation windows (N, seq_len) of `data`: its held-out half, first windows first."""
    from .data import windows_for

    return windows_for(tokenizer, data, split="eval", seq_len=seq_len, num_windows=num_windows, seed=seed,
                       text_column=text_column)


def final_norm_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The shared final norm and LM head of a decoder-only causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or getattr(decoder, "ln_f", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if norm is None or head is None:
        raise ConfigError(f"{type(model).__name__} has no final norm + LM head to read an early exit from")
    return norm, head


def num_layers(model: nn.Module) -> int:
    return int(getattr(model.config, "num_hidden_layers", 0))


def exit_logits(model: nn.Module, input_ids: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the sub-model made of the first `exit_layer` blocks + the shared final
    norm and LM head (Sorted fine-tuning's sub-models). None or the last layer = the full model."""
    total = num_layers(model)
    if exit_layer is None or exit_layer == total:
        return model(input_ids=input_ids, use_cache=False).logits
    if not 1 <= exit_layer <= total:
        raise ConfigError(f"`exit_layer` must be in [1, {total}] for this model, got {exit_layer}")
    norm, head = final_norm_and_head(model)
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    # hidden_states[0] is the embedding output, hidden_states[n] the output of block n.
    return head(norm(out.hidden_states[exit_layer]))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, exit_layer: int | None = None,
               progress: Callable[[Iterable, str], Iterable] | None = None) -> dict[str, float]:
    """Token-level perplexity over non-overlapping windows (N, T): exp(mean NLL of next tokens)."""
    model.eval()
    device = input_device(model)
    total_nll, total_tokens = 0.0, 0
    starts = range(0, windows.shape[0], batch_size)
    for start in (progress(starts, "perplexity") if progress else starts):
        batch = windows[start:start + batch_size].to(device)
        logits = exit_logits(model, batch, exit_layer).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean) if mean < 700 else float("inf"), "nll": mean, "tokens": total_tokens}


@torch.no_grad()
def pooled_embeddings(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (N, d) — sentence-transformers' pooling."""
    model.eval()
    device = input_device(model)
    chunks = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch), output_hidden_states=True)
        hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        chunks.append(F.normalize(hidden.float().mean(dim=1), dim=-1))
    return torch.cat(chunks)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean cosine between matching rows of two (N, d) L2-normalised embedding sets."""
    return float((reference * candidate).sum(dim=-1).mean())

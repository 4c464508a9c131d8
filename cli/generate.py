"""`compressor generate [MODEL] --prompt TEXT`: greedy or sampled text, e.g. to eyeball a compressed model."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DeviceOpt, ModelArg, TrustOpt, console, err_console, handle_errors


@handle_errors
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "Once upon a time",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 48,
    temperature: Annotated[float, typer.Option(help="sampling temperature; 0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed for sampling")] = 0,
    device: DeviceOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Continue a prompt (compressed layers run through compressor.kernels; Triton on CUDA).

    The prompt and the new tokens must fit the model's context: `--max-new-tokens` beyond it is
    refused, and a prompt too long for the rest is cut from the left (the count is printed)."""
    import torch

    from compressor import preflight
    from compressor.context import resolve_device
    from compressor.errors import ConfigError
    from compressor.models import load_model

    preflight.check_flags(device, {"--max-new-tokens": max_new_tokens}, minimum=0)
    if not temperature >= 0:
        raise ConfigError(f"`--temperature` must be >= 0 (0 = greedy), got {temperature}")
    context = preflight.model_context(model)
    check_new_tokens(max_new_tokens, context)
    device = resolve_device(device)
    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code)
    if not loaded.causal:
        raise ConfigError("`generate` needs a causal LM")
    context = preflight.context_of(loaded.model.config) or context
    check_new_tokens(max_new_tokens, context)
    torch.manual_seed(seed)
    ids = fit_prompt(loaded.tokenizer(prompt, return_tensors="pt", verbose=False).input_ids, max_new_tokens, context)
    if max_new_tokens == 0:  # nothing to generate: the prompt as the model reads it
        console.print(loaded.tokenizer.decode(ids[0], skip_special_tokens=True))
        return
    sample = temperature > 0
    output = loaded.model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=sample,
                                   temperature=temperature if sample else None, top_p=None, top_k=None,
                                   pad_token_id=loaded.tokenizer.eos_token_id)
    console.print(loaded.tokenizer.decode(output[0], skip_special_tokens=True))


def check_new_tokens(max_new_tokens: int, context: int | None) -> None:
    """Refuse more new tokens than the context holds next to at least one prompt token."""
    from compressor.errors import ConfigError

    if context is not None and max_new_tokens >= context:
        raise ConfigError(f"`--max-new-tokens` is {max_new_tokens} but the model's context is {context} tokens "
                          f"(prompt included); pass at most {context - 1}")


def fit_prompt(ids, max_new_tokens: int, context: int | None):
    """`ids` (1, n), cut from the left so that prompt + new tokens fit `context`; says how many went."""
    if context is None or ids.shape[1] + max_new_tokens <= context:
        return ids
    keep = context - max_new_tokens
    err_console.print(f"note: the prompt has {ids.shape[1]} tokens, more than the {keep} that fit the model's "
                      f"context of {context} with {max_new_tokens} new tokens; its first {ids.shape[1] - keep} "
                      "tokens were dropped", highlight=False, soft_wrap=True)
    return ids[:, -keep:]

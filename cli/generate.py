"""`compressor generate [MODEL] --prompt TEXT`: greedy or sampled text, e.g. to eyeball a compressed model."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import DeviceOpt, ModelArg, TrustOpt, console, handle_errors


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
    """Continue a prompt (compressed layers run through compressor.kernels; Triton on CUDA)."""
    import torch

    from compressor import preflight
    from compressor.context import resolve_device
    from compressor.errors import ConfigError
    from compressor.models import load_model

    preflight.check_flags(device, {"--max-new-tokens": max_new_tokens}, minimum=0)
    if not temperature >= 0:
        raise ConfigError(f"`--temperature` must be >= 0 (0 = greedy), got {temperature}")
    device = resolve_device(device)
    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code)
    if not loaded.causal:
        raise ConfigError("`generate` needs a causal LM")
    torch.manual_seed(seed)
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    sample = temperature > 0
    output = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample,
                                   temperature=temperature if sample else None, top_p=None, top_k=None,
                                   pad_token_id=loaded.tokenizer.eos_token_id)
    console.print(loaded.tokenizer.decode(output[0], skip_special_tokens=True))

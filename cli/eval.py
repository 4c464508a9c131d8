"""`compressor eval [MODEL] --data PATH`: perplexity (causal LMs) over non-overlapping windows."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Annotated

import torch
import typer

from compressor import evaluation, preflight
from compressor.context import Context
from compressor.errors import ConfigError, ModelError
from compressor.models import load_model
from compressor.outdir import claim_output

from .common import DeviceOpt, ModelArg, OverwriteOpt, QuietOpt, SeedOpt, TrustOpt, console, handle_errors


@handle_errors
def eval_command(
    model: ModelArg = None,
    data: Annotated[str, typer.Option(help="`default` (embedded TinyStories), a .txt/.jsonl/.csv/.tsv file or a "
                                           "datasets name")] = "default",
    split: Annotated[str, typer.Option(help="eval (held-out half), train, or all of a file")] = "eval",
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
    num_windows: Annotated[int | None, typer.Option(help="windows to score (default: all)")] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    exit_layer: Annotated[int | None, typer.Option(help="score the sub-model of the first n blocks + shared "
                                                         "final norm and head (Sorted FT exits)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write eval.json into this folder")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of a causal LM on held-out text (non-overlapping windows)."""
    if split not in ("eval", "train", "all"):
        raise ConfigError(f"`--split` must be eval, train or all, got {split!r}")
    preflight.check_flags(device, {"--batch-size": batch_size, "--seq-len": seq_len, "--num-windows": num_windows,
                                   "--exit-layer": exit_layer}, seq_len=seq_len, model=model)
    # --out is checked and locked before the model loads: a bad folder fails at once.
    with claim_output(out, overwrite=overwrite, inputs=[model, data]) if out else contextlib.nullcontext() as claim:
        loaded = load_model(model, device=device, trust_remote_code=trust_remote_code)
        preflight.check_seq_lens([("--seq-len", seq_len)], preflight.context_of(loaded.model.config))
        if not loaded.causal:
            raise ConfigError("`compressor eval` measures perplexity and needs a causal LM; for encoders use a recipe "
                              "with `evaluate:` (embedding cosine) or benchmarks/quality.py")
        ctx = Context(tokenizer=loaded.tokenizer, device=torch.device(device), seed=seed, quiet=quiet)
        windows = _windows(ctx, data, split, seq_len, num_windows)
        result = evaluation.perplexity(loaded.model, windows, batch_size=batch_size, exit_layer=exit_layer,
                                       progress=None if quiet else lambda it, d: ctx.progress(it, d))
        payload = {"model": loaded.source, "data": data, "split": split, "seq_len": seq_len,
                   "windows": int(windows.shape[0]), "exit_layer": exit_layer, **result}
        problems = [] if math.isfinite(result["perplexity"]) else [f"perplexity is {result['perplexity']}"]
        console.print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
                      f"({windows.shape[0]} windows of {seq_len}{f', exit {exit_layer}' if exit_layer else ''})")
        if claim is not None:
            with claim.stage() as tmp:
                (tmp / "eval.json").write_text(json.dumps(payload, indent=2))
                claim.publish(tmp, command="eval", problems=problems)
            console.print(f"wrote {out}/eval.json")
        if problems:
            raise ModelError(f"the result is not usable: {problems[0]}; the model's weights or the data are "
                             "broken (check `compressor eval` on the model it came from)")


def _windows(ctx: Context, data: str, split: str, seq_len: int, num_windows: int | None) -> torch.Tensor:
    if split == "all":
        from compressor.data import load_texts, make_windows, token_stream

        stream = token_stream(ctx.tokenizer, load_texts(data))
        return make_windows(stream, seq_len, num_windows, ctx.seed, shuffle=False)
    return ctx.windows(data, split=split, seq_len=seq_len, num_windows=num_windows)

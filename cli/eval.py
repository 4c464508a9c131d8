"""`compressor eval [MODEL] --data PATH`: perplexity (causal LMs) over non-overlapping windows.

The defaults are the evaluation protocol of compressor.evaluation: the first 64 windows of 256
tokens of the held-out half of the text, the same windows compress / finetune / run score.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DATA_HELP,
    DeviceOpt,
    ModelArg,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    TextColumnOpt,
    TrustOpt,
    console,
    handle_errors,
)


@handle_errors
def eval_command(
    model: ModelArg = None,
    data: Annotated[str, typer.Option("--data", "--eval-data", help=f"text to score: {DATA_HELP}")] = "default",
    text_column: TextColumnOpt = None,
    split: Annotated[str, typer.Option(help="eval (the held-out second half), train (the first half), or all")] = "eval",
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
    num_windows: Annotated[int | None, typer.Option(
        help="windows to score, the first ones of the split; 0 = all of them")] = 64,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 8,
    exit_layer: Annotated[int | None, typer.Option(
        show_default=False, help="score the sub-model of the first n blocks + shared final norm and head "
                                 "(Sorted FT exits) [default: the full model]")] = None,
    tasks: Annotated[str | None, typer.Option(
        show_default=False, help="lm-evaluation-harness tasks to score too, comma-separated, e.g. tinystories_cloze "
                                 "(shipped, offline) or hellaswag,arc_easy (needs the `eval` extra)")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(
        show_default=False, help="a folder of extra lm-eval task YAML files (e.g. tasks with local data files)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", show_default=False,
                                             help="write eval.json into this folder [default: write nothing]")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of a causal LM on held-out text (non-overlapping windows), and lm-eval task scores."""
    from compressor import evaluation, lm_eval_bridge, preflight
    from compressor.context import Context, resolve_device
    from compressor.errors import ConfigError, ModelError
    from compressor.models import load_model
    from compressor.outdir import claim_output

    if split not in ("eval", "train", "all"):
        raise ConfigError(f"`--split` must be eval, train or all, got {split!r}")
    preflight.check_flags(device, {"--batch-size": batch_size, "--seq-len": seq_len, "--num-windows": num_windows or None,
                                   "--exit-layer": exit_layer}, seq_len=seq_len, model=model)
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if task_names and exit_layer is not None:
        raise ConfigError("`--tasks` scores the full model; drop `--exit-layer` (or run the two separately)")
    if tasks is not None and not task_names:
        raise ConfigError("`--tasks` is empty; name lm-eval tasks, comma-separated, e.g. --tasks tinystories_cloze")
    manager = lm_eval_bridge.check_tasks(task_names, tasks_dir) if task_names else None
    # --out is checked and locked before the model loads: a bad folder fails at once.
    with claim_output(out, overwrite=overwrite, inputs=[model, data]) if out else contextlib.nullcontext() as claim:
        loaded = load_model(model, device=resolve_device(device), trust_remote_code=trust_remote_code)
        preflight.check_seq_lens([("--seq-len", seq_len)], preflight.context_of(loaded.model.config))
        if not loaded.causal:
            raise ConfigError("`compressor eval` measures perplexity and needs a causal LM; for encoders use a recipe "
                              "with `evaluate:` (embedding cosine) or benchmarks/quality.py")
        ctx = Context(tokenizer=loaded.tokenizer, device=resolve_device(device), seed=seed, quiet=quiet,
                      text_column=text_column)
        windows = _windows(ctx, data, split, seq_len, num_windows or None)
        result = evaluation.perplexity(loaded.model, windows, batch_size=batch_size, exit_layer=exit_layer,
                                       progress=None if quiet else lambda it, d: ctx.progress(it, d))
        payload = {"model": loaded.source, "data": data, "split": split, "seq_len": seq_len,
                   "windows": int(windows.shape[0]), "exit_layer": exit_layer, **result}
        problems = [] if math.isfinite(result["perplexity"]) else [f"perplexity is {result['perplexity']}"]
        console.print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
                      f"({windows.shape[0]} windows of {seq_len}{f', exit {exit_layer}' if exit_layer else ''})")
        if manager is not None and not problems:
            payload["tasks"] = lm_eval_bridge.task_scores(loaded.model, loaded.tokenizer, task_names,
                                                          batch_size=batch_size, manager=manager, quiet=quiet)
            _print_scores(payload["tasks"])
        if claim is not None:
            with claim.stage() as tmp:
                (tmp / "eval.json").write_text(json.dumps(payload, indent=2))
                claim.publish(tmp, command="eval", problems=problems)
            console.print(f"wrote {out}/eval.json")
        if problems:
            raise ModelError(f"the result is not usable: {problems[0]}; the model's weights or the data are "
                             "broken (check `compressor eval` on the model it came from)")


def _windows(ctx, data: str, split: str, seq_len: int, num_windows: int | None):
    from compressor import evaluation

    if split == "all":
        from compressor.data import load_texts, make_windows, token_stream

        stream = token_stream(ctx.tokenizer, load_texts(data, ctx.text_column))
        return make_windows(stream, seq_len, num_windows, ctx.seed, shuffle=False)
    if split == "eval":
        return evaluation.heldout_windows(ctx.tokenizer, data, seq_len=seq_len, num_windows=num_windows,
                                          text_column=ctx.text_column)
    return ctx.windows(data, split=split, seq_len=seq_len, num_windows=num_windows)


def _print_scores(scores: dict[str, dict[str, float]]) -> None:
    """One line per task: each metric, with its standard error when lm-eval gave one."""
    for task, metrics in scores.items():
        shown = [f"{name} {value:.4f}" + (f" ± {metrics[name + '_stderr']:.4f}" if name + "_stderr" in metrics else "")
                 for name, value in metrics.items() if not name.endswith("_stderr")]
        console.print(f"{task}: {', '.join(shown)}")

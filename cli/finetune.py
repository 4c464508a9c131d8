"""`compressor finetune --method M [MODEL] --data D --steps N --lr X --out DIR`: one fine-tuning stage.

Flags fill the stage's config (every fine-tuning config extends `TrainConfig`); anything else is
`--set key=value`. The Pipeline runs it, exactly as `compressor run` would run the recipe.
"""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.protocol import PROTOCOL

from .common import (
    DATA_HELP,
    DeviceOpt,
    DtypeOpt,
    EvalWindowsOpt,
    ModelArg,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    SetOpt,
    TextColumnOpt,
    TrustOpt,
    handle_errors,
    method_help,
    print_metrics,
    stage_fields,
)
from .outcome import print_notes, print_outcome

LOAD_IN = ("4bit", "8bit")
TRAIN_DEFAULTS = "see `compressor methods METHOD`"


@handle_errors
def finetune(
    model: ModelArg = None,
    method: Annotated[str, typer.Option("--method", "-m", help=method_help("finetune"))] = "mezo",
    data: Annotated[str | None, typer.Option(
        show_default=False, help=f"training data (its first half): {DATA_HELP}; or a labelled .tsv/.csv/.jsonl with "
                                 "--task classification [default: default]")] = None,
    eval_data: Annotated[str | None, typer.Option(
        show_default=False, help="held-out text scored before/after and by the stage (its second half) "
                                 "[default: the held-out half of --data]")] = None,
    text_column: TextColumnOpt = None,
    task: Annotated[str | None, typer.Option(show_default=False, help="lm or classification [default: lm]")] = None,
    steps: Annotated[int | None, typer.Option(show_default=False,
                                              help="optimizer steps [default: 100]")] = None,
    lr: Annotated[float | None, typer.Option(
        show_default=False, help="peak learning rate [default: per method and optimizer: adamw 1e-4, mezo 1e-4 "
                                 "(full weights); " + TRAIN_DEFAULTS + "]")] = None,
    batch_size: Annotated[int | None, typer.Option(show_default=False,
                                                   help="examples or windows per batch [default: 8]")] = None,
    seq_len: Annotated[int | None, typer.Option(show_default=False,
                                                help="tokens per training window / example [default: 128]")] = None,
    r: Annotated[int | None, typer.Option(
        "--r", show_default=False, help="adapter rank r, peft's name (lora, nola, dsee; kappatune and mezo: "
                                        f"`lora_r`) [default: per method, {TRAIN_DEFAULTS}]")] = None,
    targets: Annotated[list[str] | None, typer.Option(
        "--targets", show_default=False, metavar="NAME", help=f"names / re:regex of linears to train, repeatable [default: "
                                              f"per method, {TRAIN_DEFAULTS}]")] = None,
    resume: Annotated[str | None, typer.Option(
        show_default=False, help="continue a previous run (its output folder) [default: start fresh]")] = None,
    load_in: Annotated[str | None, typer.Option(
        show_default=False, help="load the frozen base in 4bit or 8bit (bitsandbytes) [default: full precision]")] = None,
    merge: Annotated[bool, typer.Option("--merge", show_default=False,
                                        help="write plain dense weights (adapters merged)")] = False,
    dtype: DtypeOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", show_default=False,
                                            help="output folder, written atomically [default: finetuned-METHOD]")] = None,
    overwrite: OverwriteOpt = False,
    eval_windows: EvalWindowsOpt = PROTOCOL["num_windows"],
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune MODEL on --data and write the tuned checkpoint, the report and the training curves.

    Held-out perplexity before/after is scored on the held-out half of --eval-data (or of --data),
    the same windows `compressor eval MODEL --data ...` scores."""
    from compressor.errors import ConfigError
    from compressor.pipeline import Pipeline

    if load_in is not None and load_in not in LOAD_IN:
        raise ConfigError(
            f"`--load-in` must be 4bit or 8bit, got {load_in!r}; omit it for full precision"
        )
    flags = {"data": data, "eval-data": eval_data, "text-column": text_column, "task": task, "steps": steps, "lr": lr,
             "batch-size": batch_size, "seq-len": seq_len, "targets": targets or None, "resume": resume,
             "eval-windows": eval_windows, "r": r}  # fmt: skip
    out = out or f"finetuned-{method}"
    # One protocol: the before/after table scores the same text and windows as the stage itself.
    # (A classification run is scored on general text: its --data holds labelled examples.)
    lm_text = eval_data or data if (task or "lm") == "lm" else eval_data
    evaluate = {"data": lm_text or "default", "num_windows": eval_windows}
    pipeline = Pipeline.from_flags(
        method, stage_fields(method, "finetune", flags), set_, model=model, device=device, seed=seed, out=str(out), overwrite=overwrite,
        load_in=load_in, merge=merge, dtype=dtype, trust_remote_code=trust_remote_code, text_column=text_column, evaluate=evaluate,
    )  # fmt: skip
    report, _ = pipeline.run(quiet=quiet)
    record = report.stages[0]
    print_metrics(f"{method} ({record.seconds:.1f} s)", record.metrics)
    print_notes(record)
    print_outcome(report, out, "finetune")

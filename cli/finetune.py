"""`compressor finetune --method M [MODEL] --data D --steps N --lr X --out DIR`: one fine-tuning stage.

Flags fill the stage's config (every fine-tuning config extends `TrainConfig`); anything else is
`--set key=value`. The Pipeline runs it, exactly as `compressor run` would run the recipe.
"""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.errors import ConfigError
from compressor.pipeline import Pipeline
from compressor.registry import get_method, method_names

from .common import (
    DeviceOpt,
    ModelArg,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    SetOpt,
    TrustOpt,
    console,
    handle_errors,
    print_evaluation,
    print_metrics,
    stage_fields,
)

LOAD_IN = ("4bit", "8bit")


def check_method(method: str) -> None:
    if method not in method_names("finetune"):
        get_method(method)  # unknown names get the did-you-mean error
        raise ConfigError(
            f"`--method {method}` is not a fine-tuning method (fine-tuning methods: "
            f"{', '.join(method_names('finetune'))}); use `compressor compress --method {method}`"
        )


@handle_errors
def finetune(
    model: ModelArg = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="backprop, mezo, sorted, lora, nola, dsee, "
            "kappatune, ... (see `compressor methods`)",
        ),
    ] = "mezo",
    data: Annotated[
        str | None,
        typer.Option(
            help="training data: default, a text file, a labelled "
            ".tsv/.csv/.jsonl (with --task classification) or a datasets name"
        ),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="held-out data (default: a held-out split of --data)")
    ] = None,
    task: Annotated[str | None, typer.Option(help="lm or classification")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="examples or windows per batch")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per window / example")] = None,
    targets: Annotated[
        list[str] | None, typer.Option("--targets", help="names / re:regex of linears to train")
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="continue a previous run (its output folder)")
    ] = None,
    load_in: Annotated[
        str | None, typer.Option(help="load the frozen base in 4bit or 8bit (bitsandbytes)")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="write plain dense weights (adapters merged)")
    ] = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    eval_windows: Annotated[
        int, typer.Option(help="held-out windows of general text for before/after")
    ] = 32,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune MODEL on --data and write the tuned checkpoint, the report and the training curves."""
    check_method(method)
    if load_in is not None and load_in not in LOAD_IN:
        raise ConfigError(
            f"`--load-in` must be 4bit or 8bit, got {load_in!r}; omit it for full precision"
        )
    flags = {"data": data, "eval-data": eval_data, "task": task, "steps": steps, "lr": lr, "batch-size": batch_size,
             "seq-len": seq_len, "targets": targets or None, "resume": resume}  # fmt: skip
    out = out or f"finetuned-{method}"
    pipeline = Pipeline.from_flags(
        method, stage_fields(method, flags), set_, model=model, device=device, seed=seed, out=str(out), overwrite=overwrite,
        load_in=load_in, merge=merge, trust_remote_code=trust_remote_code, evaluate={"num_windows": eval_windows},
    )  # fmt: skip
    report, _ = pipeline.run(quiet=quiet)
    record = report.stages[0]
    print_metrics(f"{method} ({record.seconds:.1f} s)", record.metrics)
    for note in record.notes[:20]:
        console.print(f"note: {note}")
    print_evaluation(report.evaluation)
    console.print(f"wrote {out} (reload with compressor.load('{out}') or pass it as MODEL)")

"""`compressor compress --method M --rank R [MODEL]`: one compression stage from flags."""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.protocol import PROTOCOL

from .common import (
    DeviceOpt,
    DtypeOpt,
    EvalDataOpt,
    EvalWindowsOpt,
    MaxMemoryOpt,
    ModelArg,
    OffloadFolderOpt,
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

# Shown in --help; the values come from the method's config (`compressor methods NAME`).
METHOD_DEFAULT = "[default: the method's own, see `compressor methods METHOD`]"


@handle_errors
def compress(
    model: ModelArg = None,
    method: Annotated[str, typer.Option("--method", "-m", help=method_help("compress"))] = "saes-svd",
    rank: Annotated[float | None, typer.Option(
        show_default=False, help="KEEP ratio: parameters kept / dense parameters of the targeted linears, 0 < R ≤ 1 "
                                 "(low-rank family, maestro) [default: 0.5 for the low-rank family; see "
                                 "`compressor methods METHOD`]")] = None,
    keep_bytes: Annotated[float | None, typer.Option(
        show_default=False, help="dsformer: KEEP ratio in stored bytes (sparse index metadata included), "
                                 f"0 < B ≤ 1 {METHOD_DEFAULT}")] = None,
    bits: Annotated[int | None, typer.Option(
        show_default=False, help=f"gptq, rtn: code width, one of 2, 3, 4, 8 {METHOD_DEFAULT}")] = None,
    group_size: Annotated[int | None, typer.Option(
        show_default=False, help="gptq, rtn: input columns sharing one scale, a divisor of in_features, or 0 for "
                                 f"per-channel {METHOD_DEFAULT}")] = None,
    target_bytes: Annotated[float | None, typer.Option(
        show_default=False, help="gptq: at most this fraction of the dense bf16 checkpoint's bytes on disk, "
                                 "0 < B ≤ 1; bits (and group size, correction rank) chosen per matrix by loss per "
                                 "byte [default: off, one format]")] = None,
    allocation: Annotated[str | None, typer.Option(
        show_default=False, help="uniform (one keep ratio per matrix), welore (non-uniform ranks from the "
                                 "singular-value tails) or aware (svd-llm, saes-svd: one rank multiplier per block, "
                                 "chosen from the calibration loss under the same budget; `compressor methods "
                                 "saes-svd` lists its fields) [default: uniform]")] = None,
    calib: Annotated[str | None, typer.Option(
        show_default=False, help="calibration text (its first half): default, a file, or a datasets name "
                                 "[default: default, the embedded TinyStories excerpt]")] = None,
    calib_windows: Annotated[int | None, typer.Option(
        show_default=False, help=f"calibration windows {METHOD_DEFAULT}")] = None,
    targets: Annotated[list[str] | None, typer.Option(
        "--targets", show_default=False, metavar="NAME", help="names / re:regex to include, repeatable [default: every linear but "
                                              "lm_head and embeddings]")] = None,
    ignore: Annotated[list[str] | None, typer.Option(
        "--ignore", show_default=False, metavar="NAME", help="names / re:regex to exclude, repeatable [default: none]")] = None,
    from_trained: Annotated[str | None, typer.Option(
        show_default=False, help="maestro: truncate a trained run's output folder without retraining "
                                 "[default: train]")] = None,
    merge: Annotated[bool, typer.Option("--merge", show_default=False,
                                        help="write plain dense nn.Linear weights instead of factored layers")] = False,
    dtype: DtypeOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    out: Annotated[str | None, typer.Option("--out", "-o", show_default=False,
                                            help="output folder, written atomically [default: compressed-METHOD]")] = None,
    overwrite: OverwriteOpt = False,
    eval_data: EvalDataOpt = "default",
    text_column: TextColumnOpt = None,
    eval_windows: EvalWindowsOpt = PROTOCOL["num_windows"],
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress the targeted linears and write a reloadable checkpoint, report.md/json and plots.

    Held-out perplexity is measured before and after on the same windows `compressor eval` scores."""
    from compressor.pipeline import Pipeline

    flags = {"rank": rank, "keep-bytes": keep_bytes, "allocation": allocation, "calib": calib,
             "bits": bits, "group-size": group_size, "target-bytes": target_bytes,
             "calib-windows": calib_windows, "targets": targets or None, "ignore": ignore or None,
             "from-trained": from_trained}
    out = out or f"compressed-{method}"
    pipeline = Pipeline.from_flags(method, stage_fields(method, "compress", flags), set_, model=model, device=device,
                                   seed=seed, out=str(out), overwrite=overwrite, merge=merge, dtype=dtype, trust_remote_code=trust_remote_code,
                                   max_memory=max_memory, offload_folder=offload_folder, text_column=text_column,
                                   evaluate={"data": eval_data, "num_windows": eval_windows})
    report, _ = pipeline.run(quiet=quiet)
    record = report.stages[0]
    print_metrics(f"{method} ({record.seconds:.1f} s)", record.metrics)
    print_notes(record)
    print_outcome(report, out, "compress")

"""`compressor compress --method M --rank R [MODEL]`: one compression stage from flags."""

from __future__ import annotations

from typing import Annotated

import typer

from compressor.errors import ConfigError
from compressor.pipeline import Pipeline
from compressor.registry import get_method, method_names

from .common import (
    DeviceOpt,
    MaxMemoryOpt,
    ModelArg,
    OffloadFolderOpt,
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

# CLI flag -> the config field names it may fill, first match wins.
FLAG_FIELDS = {
    "rank": ("rank",), "allocation": ("allocation",), "calib": ("calibration", "calib_data"),
    "calib-windows": ("num_windows", "calib_windows"), "targets": ("targets",), "ignore": ("ignore",),
    "from-trained": ("from_trained",),
}


@handle_errors
def compress(
    model: ModelArg = None,
    method: Annotated[str, typer.Option("--method", "-m", help="svd, asvd, svd-llm, saes-svd, welore, dsformer, "
                                                               "maestro, prune (see `compressor methods`)")] = "saes-svd",
    rank: Annotated[float | None, typer.Option(help="KEEP ratio: parameters kept / dense parameters of the "
                                                    "targeted linears, 0 < R ≤ 1 (dsformer: stored bytes kept, "
                                                    "sparse index metadata included)")] = None,
    allocation: Annotated[str | None, typer.Option(help="uniform or welore (non-uniform ranks)")] = None,
    calib: Annotated[str | None, typer.Option(help="calibration text: default, a file, or a datasets name")] = None,
    calib_windows: Annotated[int | None, typer.Option(help="calibration windows")] = None,
    targets: Annotated[list[str] | None, typer.Option("--targets", help="names / re:regex to include")] = None,
    ignore: Annotated[list[str] | None, typer.Option("--ignore", help="names / re:regex to exclude")] = None,
    from_trained: Annotated[str | None, typer.Option(help="maestro: truncate a trained run without retraining")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="write a plain dense checkpoint")] = False,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    eval_windows: Annotated[int, typer.Option(help="held-out windows for before/after quality")] = 32,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress the targeted linears and write a reloadable checkpoint + report."""
    if method not in method_names("compress"):
        get_method(method)  # unknown names get the did-you-mean error
        raise ConfigError(f"`{method}` is not a compression method; use `compressor finetune --method {method}` "
                          f"(compression methods: {', '.join(method_names('compress'))})")
    flags = {"rank": rank, "allocation": allocation, "calib": calib, "calib-windows": calib_windows,
             "targets": targets or None, "ignore": ignore or None, "from-trained": from_trained}
    out = out or f"compressed-{method}"
    pipeline = Pipeline.from_flags(method, stage_fields(method, flags, FLAG_FIELDS), set_, model=model, device=device, seed=seed,
                                   out=str(out), overwrite=overwrite, merge=merge, trust_remote_code=trust_remote_code,
                                   max_memory=max_memory, offload_folder=offload_folder,
                                   evaluate={"num_windows": eval_windows})
    report, _ = pipeline.run(quiet=quiet)
    record = report.stages[0]
    print_metrics(f"{method} ({record.seconds:.1f} s)", record.metrics)
    for note in record.notes[:20]:
        console.print(f"note: {note}")
    print_evaluation(report.evaluation)
    console.print(f"wrote {out} (reload with compressor.load('{out}') or pass it as MODEL)")

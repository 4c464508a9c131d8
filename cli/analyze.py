"""`compressor analyze [MODEL]`: spectra, κ, effective rank, WeLore ranks and LRC verdicts."""

from __future__ import annotations

from typing import Annotated

import typer

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
    stage_fields,
)


@handle_errors
def analyze(
    model: ModelArg = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    targets: Annotated[list[str] | None, typer.Option(
        "--targets", show_default=False, metavar="NAME", help="names / re:regex to include, repeatable [default: every linear but "
                                              "lm_head and embeddings]")] = None,
    ignore: Annotated[list[str] | None, typer.Option(
        "--ignore", show_default=False, metavar="NAME", help="names / re:regex to exclude, repeatable [default: none]")] = None,
    top_p: Annotated[float, typer.Option(help="KappaTune: fraction of lowest-κ tensors selected")] = 0.2,
    reduction: Annotated[float, typer.Option(help="WeLore: total rank reduction targeted")] = 0.5,
    no_cache: Annotated[bool, typer.Option("--no-cache", show_default=False,
                                           help="recompute spectra instead of reusing the cache")] = False,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    set_: SetOpt = None,
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-linear singular-value spectra, condition numbers (KappaTune), effective/stable rank,
    WeLore heavy-tail ranks and LRC/N-LRC split. Prints a table; --out writes report.json, report.md and
    PNG plots (without --out nothing is written)."""
    from compressor.pipeline import Pipeline

    flags = {"targets": targets or None, "ignore": ignore or None, "top-p": top_p, "reduction": reduction,
             "use-cache": not no_cache}
    pipeline = Pipeline.from_flags("analyze", stage_fields("analyze", "analyze", flags), set_, model=model, device=device, seed=seed,
                                   out=str(out) if out else None, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                   max_memory=max_memory, offload_folder=offload_folder)
    report, _ = pipeline.run(quiet=quiet)
    record = report.stages[0]
    print_layer_table(record.per_module)
    m = record.metrics
    console.print(f"{m['layers']} linears; WeLore τ = {m['welore_tau']:.4f} removes "
                  f"{m['welore_reduction_reached']:.1%} of ranks ({m['welore_lrc_layers']} LRC layers); "
                  f"KappaTune selects {m['kappatune_selected']}; SVD sweep {m['svd_seconds']:.2f} s "
                  f"({m['cache_hits']} cached)")
    for line in record.notes:
        console.print(line, highlight=False, soft_wrap=True)
    if out:
        console.print(f"wrote {out}/report.json, report.md and plots")
    else:
        console.print("nothing written (add --out DIR for report.json, report.md and plots)")


def print_layer_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="per-linear spectra", title_justify="left")
    for column in ("module", "shape", "κ", "eff. rank", "stable rank", "WeLore kept", "LRC", "KappaTune"):
        table.add_column(column, justify="left" if column == "module" else "right", no_wrap=column == "module")
    for r in rows:
        table.add_row(r["module"], "×".join(map(str, r["shape"])), f"{r['kappa']:.3g}", f"{r['effective_rank']:.1f}",
                      f"{r['stable_rank']:.2f}", f"{r['welore_kept']}/{r['full_rank']}", "yes" if r["lrc"] else "",
                      "yes" if r["kappatune_selected"] else "")
    console.print(table)

"""`compressor run recipe.yaml`: the same stages from a YAML recipe; exit code gates quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DtypeOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    SetOpt,
    console,
    handle_errors,
    print_metrics,
)
from .outcome import print_outcome


@handle_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/)", show_default=False)],
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    dtype: DtypeOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", show_default=False,
                                          help="validate the recipe and print it resolved; load no model")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a YAML recipe. Exit codes: 0 ok, 1 runtime error, 2 invalid recipe, 3 quality gate missed.

    Outputs go to --out (or the recipe's `out:`); with neither, the run reports and writes nothing."""
    from compressor.pipeline import Pipeline

    overrides = list(set_ or [])
    if out is not None:
        overrides.append(f"out={out}")
    if overwrite:
        overrides.append("overwrite=true")
    if dtype is not None:
        overrides.append(f"dtype={dtype}")
    pipeline = Pipeline.from_file(recipe, overrides)
    if dry_run:
        import yaml

        console.print(yaml.safe_dump(pipeline.to_recipe(), sort_keys=False))
        return
    report, _ = pipeline.run(quiet=quiet)
    for record in report.stages:
        print_metrics(f"stage {record.stage} ({record.seconds:.1f} s)", record.metrics)
    for gate in report.gates:
        console.print(f"gate {gate['gate']}: {gate['value']:.4g} (limit {gate['limit']}) passed")
    print_outcome(report, pipeline.out, "run")

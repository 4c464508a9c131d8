"""`compressor compare RUN_DIR...`: checkpoints of one model and their source in one table, measured
again under one protocol (see compressor.compare), with a frontier plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from .common import DATA_HELP, DeviceOpt, OutOpt, OverwriteOpt, QuietOpt, console, handle_errors


@handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="checkpoint folders (written by compress / finetune / run) or "
                                                    "model folders, of one source model", show_default=False)],
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    baseline: Annotated[str | None, typer.Option(
        show_default=False, help="the reference row and ratio denominator [default: the source model the "
                                 "checkpoints record]")] = None,
    tasks: Annotated[str | None, typer.Option(
        show_default=False, help="lm-eval tasks to score every row on, comma-separated (e.g. tinystories_cloze)")] = None,
    tasks_dir: Annotated[Path | None, typer.Option(show_default=False,
                                                   help="a folder of extra lm-eval task YAML files")] = None,
    speed: Annotated[bool, typer.Option("--speed", show_default=False,
                                        help="also measure CPU greedy decode tokens/s at batch 1")] = False,
    sort: Annotated[str, typer.Option(help="sort by bytes, perplexity, parameters, name, tokens_per_s or "
                                           "TASK/METRIC (scores and speed best first)")] = "bytes",
    plot_metric: Annotated[str, typer.Option(help="the plot's quality axis: perplexity or TASK/METRIC")] = "perplexity",
    data: Annotated[str, typer.Option(help=f"held-out text for perplexity: {DATA_HELP}")] = "default",
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """One table of the checkpoints and their source model: method and settings, on-disk bytes and
    ratio, parameters, held-out perplexity (the protocol of `compressor eval`), task scores and decode
    speed where asked. --out writes compare.md, compare.json and compare.png (Pareto front marked)."""
    from compressor import compare as cmp
    from compressor.context import resolve_device
    from compressor.errors import ConfigError, ModelError
    from compressor.outdir import claim_output

    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if plot_metric != "perplexity" and plot_metric.split("/", 1)[0] not in task_names:
        raise ConfigError(f"`--plot-metric {plot_metric}` is not measured; use perplexity or TASK/METRIC of a "
                          "task given with --tasks (e.g. tinystories_cloze/acc)")
    options = {"baseline": baseline, "device": resolve_device(device), "data": data, "tasks": task_names,
               "tasks_dir": str(tasks_dir) if tasks_dir else None, "speed": speed, "sort": sort, "quiet": quiet}
    if out is None:
        rows = cmp.compare_models([str(r) for r in runs], **options)
        _print(rows, cmp)
        if _problems(rows):  # a non-finite number is never a successful result
            raise ModelError(f"the result is not usable: {'; '.join(_problems(rows)[:2])}; that checkpoint's weights "
                             "are broken (check `compressor eval` on it)")
        return
    with claim_output(out, overwrite=overwrite, inputs=[*map(str, runs), baseline]) as claim:
        rows = cmp.compare_models([str(r) for r in runs], **options)
        _print(rows, cmp)
        with claim.stage() as tmp:
            _write(tmp, rows, cmp, plot_metric, options)
            claim.publish(tmp, command="compare", problems=_problems(rows))
        console.print(f"wrote {out}/compare.md, compare.json, compare.png")


def _print(rows, cmp) -> None:
    from rich.table import Table

    columns = cmp.columns_for(rows)
    table = Table(*columns)
    for row in rows:
        table.add_row(*(cmp.cell(row.get(c)) for c in columns))
    console.print(table)


def _write(folder: Path, rows, cmp, plot_metric: str, options: dict) -> None:
    base = next(r for r in rows if r["baseline"])
    title = f"Checkpoints of {base['name']}: one protocol (compressor eval, data `{options['data']}`)"
    (folder / "compare.md").write_text(cmp.markdown(rows, cmp.columns_for(rows), title) +
                                       "\n![frontier](compare.png)\n")
    protocol = {**cmp.evaluation.PROTOCOL, "data": options["data"]}
    payload = {"protocol": protocol, "baseline": base["name"], "sort": options["sort"], "plot_metric": plot_metric,
               "tasks": options["tasks"], "rows": rows}
    (folder / "compare.json").write_text(json.dumps(payload, indent=2, default=str))
    cmp.plot_frontier(rows, plot_metric, folder / "compare.png", base["name"])


def _problems(rows) -> list[str]:
    return [f"`{r['name']}` {key} is {value}" for r in rows for key, value in r.items()
            if isinstance(value, float) and not math.isfinite(value)]

"""Report -> PNG plots (matplotlib, headless). Each plot reads records, never the model.

Every figure is meant to be read without the code: a title naming the model and the method, axis
labels with units, one quantity per axis, a legend (or colour bar) for every colour, and measured
points only (an evaluation curve has a marker where an evaluation ran, nothing in between).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from ..targeting import layer_type
from .records import Report, StageRecord

MAX_LABELLED_BARS = 48  # above this, bars are labelled by block instead of by module
_BLOCK = re.compile(r"\.(\d+)\.")

# curve name -> (axis label, panel); curves sharing a panel measure the same quantity.
CURVE_AXES = {
    "loss": ("loss (nats / token)", "loss"),
    "eval_eval_loss": ("loss (nats / token)", "loss"),
    "eval_loss": ("loss (nats / token)", "loss"),
    "eval_perplexity": ("held-out perplexity", "perplexity"),
    "eval_accuracy": ("held-out accuracy (fraction correct)", "accuracy"),
    "stf_loss": ("LM loss + KL to dense (nats / token)", "stf_loss"),
    "stf_support_change": ("initial sparse support moved (fraction)", "support"),
    "train_loss": ("training objective (loss + λ·penalty)", "objective"),
    "group_lasso": ("group-lasso penalty (sum over layers)", "penalty"),
    "total_rank": ("total rank kept (sum over layers)", "rank"),
}
# Curves measured once per epoch rather than once per step: drawn as markers at each epoch's end.
PER_EPOCH = {"total_rank"}
CURVE_LEGEND = {"loss": "training loss (each step)", "eval_eval_loss": "held-out loss (evaluated steps)",
                "eval_loss": "held-out loss (evaluated steps)", "eval_perplexity": "held-out perplexity",
                "eval_accuracy": "held-out accuracy", "stf_loss": "straight-through training loss (each step)",
                "stf_support_change": "entries of the initial N:M support no longer kept",
                "train_loss": "maestro objective (each step)", "group_lasso": "group-lasso penalty (each step)",
                "total_rank": "after each epoch's shrinking"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


def model_label(report: Report | None) -> str:
    """A short model name for titles: the folder or file name of a path, else the id."""
    source = str((report.run if report else {}).get("model") or "model")
    if source in ("default", "None"):
        return "stories260K"
    return Path(source.rstrip("/")).name if Path(source).exists() else source


def _row_type(row: dict) -> str:
    """The row's layer type; rows from some methods (dsformer, maestro, prune) carry only the
    module name, so the type is derived from it, and "other" groups rows with neither."""
    if "type" in row:
        return row["type"]
    return layer_type(row["module"]) if row.get("module") else "other"


def _block(row: dict) -> int | None:
    match = _BLOCK.search(row.get("module", ""))
    return int(match.group(1)) if match else None


def plot_spectra(record: StageRecord, folder: Path, title: str = "") -> str:
    """Normalised spectra σ_i/σ_max on one shared log scale, one panel per layer type, one line per
    matrix coloured by its transformer block."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm

    groups: dict[str, list[dict]] = defaultdict(list)
    for row in record.per_module:
        groups[_row_type(row)].append(row)
    top_block = max((b for b in (_block(r) for r in record.per_module) if b is not None), default=0)
    cmap = plt.get_cmap("viridis", top_block + 1)
    norm = BoundaryNorm([b - 0.5 for b in range(top_block + 2)], cmap.N)
    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 2.9 * rows + 0.7), squeeze=False, sharey=True,
                             sharex=True, layout="constrained")
    for ax, (kind, members) in zip(axes.flat, sorted(groups.items())):
        for member in members:
            sigma = member["spectrum"]
            top = sigma[0] if sigma and sigma[0] > 0 else 1.0
            block = _block(member)
            ax.semilogy([i / max(len(sigma) - 1, 1) for i in range(len(sigma))],
                        [max(s / top, 1e-12) for s in sigma], lw=1.1, color=cmap(norm(block)) if block is not None
                        else "grey")
        ax.set_title(f"{kind} ({len(members)} matrices)", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("σᵢ / σ_max (log scale)")
    for i, ax in enumerate(list(axes.flat)[:len(groups)]):
        if i + cols >= len(groups):  # the lowest panel of its column: it carries the x axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("index i / full rank")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.8, ticks=range(top_block + 1))
    bar.set_label("transformer block (line colour)")
    fig.suptitle(title or "singular-value spectra")
    fig.savefig(folder / "spectra.png", dpi=110)
    plt.close(fig)
    return "spectra.png"


def _bar_labels(rows: list[dict]) -> tuple[list[int], list[str], str]:
    """Tick positions, tick labels and the x-axis label of a per-module bar chart."""
    if len(rows) <= MAX_LABELLED_BARS:
        labels = [f"{_block(r)}.{_row_type(r)}" if _block(r) is not None else _row_type(r) for r in rows]
        return list(range(len(rows))), labels, "linear layer (block.type, model order)"
    spans: dict[int, list[int]] = {}  # block -> [first bar, last bar]
    for i, row in enumerate(rows):
        block = _block(row)
        if block is not None:
            spans.setdefault(block, [i, i])[1] = i
    # One label under the middle of each block's group of bars.
    return [(a + b) / 2 for a, b in spans.values()], [str(b) for b in spans], "transformer block (bars in model order)"


def _types_in_order(types: list[str]) -> list[str]:
    """Layer types in the order their first bar appears: the legend reads like the bars."""
    return list(dict.fromkeys(types))


def plot_per_layer(record: StageRecord, folder: Path, key: str, ylabel: str, filename: str, log: bool = False,
                   title: str = "", reference: tuple[float, str] | None = None) -> str:
    """One bar per linear, in model order, coloured by layer type (legend in bar order);
    `reference` = (value, label) draws a dashed horizontal line."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = record.per_module
    fig, ax = plt.subplots(figsize=(max(7.0, min(len(rows) * 0.22, 18.0)), 4.2))
    types = [_row_type(row) for row in rows]
    order = _types_in_order(types)
    colors = [f"C{order.index(kind) % 10}" for kind in types]
    ax.bar(range(len(rows)), [row[key] for row in rows], color=colors)
    ax.set_xlim(-0.75, len(rows) - 0.25)
    if log:
        ax.set_yscale("log")
    ticks, labels, xlabel = _bar_labels(rows)
    ax.set_xticks(ticks, labels, rotation=90 if len(rows) <= MAX_LABELLED_BARS else 0, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=f"C{i % 10}", label=kind) for i, kind in enumerate(order)]
    if reference is not None:
        ax.axhline(reference[0], color="black", ls="--", lw=1)
        handles.append(Line2D([], [], color="black", ls="--", lw=1, label=reference[1]))
    ax.legend(handles=handles, title="layer type", fontsize=7, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or ylabel)
    return _save(fig, folder / filename)


def eval_points(record: StageRecord, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of an evaluation curve at the steps an evaluation ran (metrics `eval_steps`,
    else before, every `eval_every` and after, from the config); the stored curve repeats the last
    evaluation between them, which is not a measurement."""
    values = record.curves[name]
    steps = [int(s) for s in str(record.metrics.get("eval_steps", "")).split(",") if s.strip().lstrip("-").isdigit()]
    total, every = record.config.get("steps"), record.config.get("eval_every")
    if not steps and isinstance(total, int):  # stages that do not report eval_steps: from the config
        steps = [0, *range(every, total, every)] if every else [0]
        steps.append(total)
    if not steps:
        return list(range(len(values))), list(values)
    start = steps[-1] - (len(values) - 1)  # curves are indexed from this run's first step
    picked = [(s, values[s - start]) for s in steps if 0 <= s - start < len(values)]
    return [s for s, _ in picked], [v for _, v in picked]


def plot_curves(record: StageRecord, index: int, folder: Path, title: str = "") -> str:
    """One panel per quantity (loss, perplexity, ...); training loss per step as a line, held-out
    metrics as markers at the evaluated steps only."""
    plt = _pyplot()
    panels: dict[str, list[str]] = defaultdict(list)
    for name, values in record.curves.items():
        if values and all(isinstance(v, (int, float)) for v in values):
            panels[CURVE_AXES.get(name, (name, name))[1]].append(name)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.8 * len(panels) + 0.5), squeeze=False, sharex=True)
    for ax, names in zip(axes[:, 0], panels.values()):
        for name in names:
            if name.startswith("eval_"):
                steps, values = eval_points(record, name)
                ax.plot(steps, values, "o--", ms=5, label=CURVE_LEGEND.get(name, name))
                for step, value in zip(steps, values):
                    ax.annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(0, 6),
                                fontsize=7, ha="center")
            elif name in PER_EPOCH:
                values = record.curves[name]
                steps_per_epoch = max(len(v) for v in record.curves.values()) / len(values)
                ends = [round((i + 1) * steps_per_epoch) - 1 for i in range(len(values))]
                ax.plot(ends, values, "s--", ms=6, label=CURVE_LEGEND.get(name, name))
            else:
                values = record.curves[name]
                ax.plot(range(len(values)), values, lw=1.0, label=CURVE_LEGEND.get(name, name))
        ax.set_ylabel(CURVE_AXES.get(names[0], (names[0],))[0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title or record.stage)
    return _save(fig, folder / f"curves_{index}_{record.stage}.png")


def plot_keep_curve(record: StageRecord, index: int, folder: Path, title: str = "") -> str:
    """Maestro's accuracy-size curve: held-out perplexity at each keep ratio of one trained model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    keeps, ppl = record.curves["curve_keep"], record.curves["curve_ppl"]
    ax.plot(keeps, ppl, "o-")
    for keep, value in zip(keeps, ppl):
        ax.annotate(f"{value:.4g}", (keep, value), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.set_yscale("log")
    ax.margins(x=0.08, y=0.2)  # room for the value labels
    ax.set_xlabel("keep ratio (parameters kept / dense parameters)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "perplexity by keep ratio")
    return _save(fig, folder / f"keep_curve_{index}_{record.stage}.png")


def plot_kept_fraction(record: StageRecord, index: int, folder: Path, name: str) -> str:
    """Per linear, parameters kept / its dense parameters (1 = kept dense), against the keep ratio
    asked for: flat under uniform allocation but for layers kept dense, varied under welore/aware."""
    rows = [{**row, "kept_fraction": row["params_kept"] / max(row["params_dense"], 1)} for row in record.per_module]
    keep, allocation = record.config.get("rank"), record.config.get("allocation")
    what = "kept / dense parameters per linear"
    if isinstance(keep, (int, float)):
        what += f" (keep {keep:g}" + (f", {allocation})" if allocation else ")")
    reference = (float(keep), f"keep ratio asked ({keep:g})") if isinstance(keep, (int, float)) else None
    trimmed = StageRecord(**{**record.__dict__, "per_module": rows})
    return plot_per_layer(trimmed, folder, "kept_fraction", "kept / dense parameters\n(1 = kept dense)",
                          f"ranks_{index}_{record.stage}.png", title=f"{name}: {what}", reference=reference)


def render_plots(report: Report, folder: Path) -> list[str]:
    """Write every applicable PNG into `folder`; returns file names."""
    model = model_label(report)
    written = []
    for index, record in enumerate(report.stages):
        rows = record.per_module
        name = f"{model} · {record.stage}"
        if rows and "spectrum" in rows[0]:
            written.append(plot_spectra(record, folder, f"{name}: singular-value spectra, normalised to σ_max"))
            written.append(plot_per_layer(record, folder, "kappa", "κ = σ_max / σ_min (log scale)", "kappa.png",
                                          log=True, title=f"{name}: condition number κ per linear"))
            written.append(plot_per_layer(record, folder, "welore_kept", "rank WeLore keeps (singular values)",
                                          "welore_ranks.png", title=f"{name}: ranks WeLore keeps for a "
                                          f"{record.config.get('welore_reduction', 0.5):.0%} total rank reduction"))
        elif rows and "params_kept" in rows[0] and "params_dense" in rows[0]:
            written.append(plot_kept_fraction(record, index, folder, name))
        elif rows and "rank" in rows[0] and len({row["rank"] for row in rows}) > 1:  # one r for all: the table says it
            if record.kind == "finetune":
                ylabel, what = "adapter rank r", "adapter rank r per linear (r·(in + out) trained parameters each)"
            else:
                ylabel, what = "rank r kept (inner dimension of the factors)", "rank kept per linear"
            written.append(plot_per_layer(record, folder, "rank", ylabel, f"ranks_{index}_{record.stage}.png",
                                          title=f"{name}: {what}"))
        curves = {k: v for k, v in record.curves.items() if k not in ("curve_keep", "curve_ppl")}
        if "curve_keep" in record.curves and "curve_ppl" in record.curves:
            written.append(plot_keep_curve(record, index, folder, f"{name}: perplexity by keep ratio"))
        if curves:
            trimmed = StageRecord(**{**record.__dict__, "curves": curves})
            written.append(plot_curves(trimmed, index, folder, f"{name}: training curves"))
    return written

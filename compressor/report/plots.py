"""Report -> PNG plots (matplotlib, headless). Each plot reads records, never the model."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..targeting import layer_type
from .records import Report, StageRecord


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


def _row_type(row: dict) -> str:
    """The row's layer type; rows from some methods (dsformer, maestro, prune) carry only the
    module name, so the type is derived from it, and "other" groups rows with neither."""
    if "type" in row:
        return row["type"]
    return layer_type(row["module"]) if row.get("module") else "other"


def plot_spectra(record: StageRecord, folder: Path) -> str:
    """Normalised spectra σ_i/σ_max on a log scale, one panel per layer type."""
    plt = _pyplot()
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in record.per_module:
        groups[_row_type(row)].append(row)
    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (kind, members) in zip(axes.flat, sorted(groups.items())):
        for member in members:
            sigma = member["spectrum"]
            top = sigma[0] if sigma and sigma[0] > 0 else 1.0
            ax.semilogy([i / max(len(sigma) - 1, 1) for i in range(len(sigma))], [max(s / top, 1e-12) for s in sigma],
                        lw=0.8, alpha=0.7)
        ax.set_title(f"{kind} ({len(members)})")
        ax.set_xlabel("normalised index")
        ax.set_ylabel("σ / σmax")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return _save(fig, folder / "spectra.png")


def plot_per_layer(record: StageRecord, folder: Path, key: str, ylabel: str, filename: str, log: bool = False) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(record.per_module) * 0.06), 3.5))
    values = [row[key] for row in record.per_module]
    types = [_row_type(row) for row in record.per_module]
    order = sorted(set(types))
    colors = [f"C{order.index(kind) % 10}" for kind in types]
    ax.bar(range(len(values)), values, color=colors)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer (model order; colour = layer type)")
    ax.set_ylabel(ylabel)
    return _save(fig, folder / filename)


def plot_curves(record: StageRecord, index: int, folder: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in record.curves.items():
        if values and all(isinstance(v, (int, float)) for v in values):
            ax.plot(range(len(values)), values, label=name)
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title(record.stage)
    return _save(fig, folder / f"curves_{index}_{record.stage}.png")


def render_plots(report: Report, folder: Path) -> list[str]:
    """Write every applicable PNG into `folder`; returns file names."""
    written = []
    for index, record in enumerate(report.stages):
        rows = record.per_module
        if rows and "spectrum" in rows[0]:
            written.append(plot_spectra(record, folder))
            written.append(plot_per_layer(record, folder, "kappa", "κ (condition number)", "kappa.png", log=True))
            written.append(plot_per_layer(record, folder, "welore_kept", "WeLore kept rank", "welore_ranks.png"))
        elif rows and "rank" in rows[0]:
            written.append(plot_per_layer(record, folder, "rank", "rank kept", f"ranks_{index}_{record.stage}.png"))
        if record.curves:
            written.append(plot_curves(record, index, folder))
    return written

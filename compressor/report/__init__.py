"""Reports: records (data), render (Markdown), plots (PNG), env (provenance)."""

from .records import Report, StageRecord, StageResult  # noqa: F401


def write_report(report: Report, folder) -> list[str]:
    """report.json, report.md and PNG plots into `folder` (already a staging folder)."""
    import json
    from pathlib import Path

    from .plots import render_plots
    from .render import render_markdown

    folder = Path(folder)
    plots = render_plots(report, folder)
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    (folder / "report.md").write_text(render_markdown(report, plots))
    return plots

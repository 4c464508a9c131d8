"""Report -> Markdown. The only place that formats a report as text."""

from __future__ import annotations

import math
from typing import Any

from .records import Report, StageRecord
from .size import size_table

HIDDEN_COLUMNS = {"spectrum"}
MAX_ROWS = 400


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "×".join(map(str, value)) if all(isinstance(v, int) for v in value) else str(value)
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    columns = columns or [c for c in rows[0] if c not in HIDDEN_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    if len(rows) > MAX_ROWS:
        lines.append(f"\n_{len(rows) - MAX_ROWS} more rows in report.json_")
    return "\n".join(lines) + "\n"


def render_stage(index: int, record: StageRecord) -> str:
    parts = [f"## Stage {index}: `{record.stage}` ({record.kind}, {record.seconds:.2f} s)\n"]
    parts.append(table([{"metric": k, "value": v} for k, v in record.metrics.items()]))
    notes = "\nNotes:\n" + "\n".join(f"- {n}" for n in record.notes) + "\n" if record.notes else ""
    if record.kind != "analyze":
        parts.append(notes)
    if record.per_module:
        parts.append("\n### Per module\n\n" + table(record.per_module))
    if record.kind == "analyze" and notes:  # what to do next, after the table it reads from
        parts.append(notes.replace("Notes:", "### What to do next", 1))
    if record.curves:
        parts.append("\nCurves: " + ", ".join(f"`{k}` ({len(v)} points)" for k, v in record.curves.items()) + "\n")
    return "\n".join(parts)


def gate_verdict(gates: list[dict[str, Any]]) -> str:
    """One line: every gate passed, or which were missed (the run then exits with code 3)."""
    missed = [g["gate"] for g in gates if not g["passed"]]
    if not missed:
        return f"**Verdict: passed** ({len(gates)} gate{'s' if len(gates) > 1 else ''})."
    return f"**Verdict: MISSED** ({', '.join(f'`{m}`' for m in missed)}; `compressor run` exits with code 3)."


def render_markdown(report: Report, plots: list[str] | None = None) -> str:
    run = report.run
    versions = run.get("versions", {})
    head = [
        "# compressor report\n",
        f"- model: `{run.get('model', '?')}`",
        f"- date: {run.get('date', '?')}; git: `{run.get('git_sha', '?')}`; seed: {run.get('seed', '?')}",
        f"- device: {run.get('device', '?')} ({run.get('device_name', '')})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- total seconds: {run.get('seconds', 0):.2f}\n",
    ]
    parts = ["\n".join(head)]
    if report.evaluation:
        parts.append("## Quality\n\n" + table([{"when": k, **v} for k, v in report.evaluation.items()]))
    if report.gates:
        parts.append("## Gates\n\n" + gate_verdict(report.gates) + "\n\n" + table(
            [{"gate": g["gate"], "value": g["value"], "limit": g["limit"], "verdict": "passed" if g["passed"] else
              "MISSED"} for g in report.gates]))
    if "after" in report.size:
        parts.append(f"## Size ({report.size['dtype']})\n\n" + table(size_table(report.size)))
    parts.extend(render_stage(i, r) for i, r in enumerate(report.stages))
    if plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    return "\n".join(parts)

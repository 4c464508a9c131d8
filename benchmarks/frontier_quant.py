"""Rows of reports/frontier_quant.json from finished `compressor run` / `compress` output folders.

Each SmolLM2 point of issue 19's byte-budgeted frontier is one output folder whose report.json holds the held-out
perplexity the pipeline measured on the written checkpoint (reloaded) and whose model.safetensors is the stored size.
This script only reads them and appends / replaces the row with the same label; benchmarks/frontier.py plots the rows.

  python benchmarks/frontier_quant.py OUT --label gptq-0.30 --recipe recipes/frontier-0.30.yaml \\
      --command "compressor run recipes/frontier-0.30.yaml --set model=... --out OUT"
"""

import argparse
import json
from collections import Counter
from pathlib import Path

from harness import REPORTS, write_text


def row_from_run(out: Path, label: str, recipe: str | None, command: str, calib: str) -> dict:
    """The frontier row of one finished output folder."""
    from compressor.report.env import git_sha

    report = json.loads((out / "report.json").read_text())
    after, stages = report["evaluation"]["after"], [s["stage"] for s in report["stages"]]
    modules = [m for s in report["stages"] for m in s.get("per_module") or []]
    return {"label": label, "method": " -> ".join(stages), "heal": "heal" in stages,
            "corrections": sum(1 for m in modules if m.get("correction_rank")),
            "formats": dict(Counter(m["format"] for m in modules if "format" in m).most_common()),
            "stored_bytes": (out / "model.safetensors").stat().st_size, "ppl": after["perplexity"],
            "eval_tokens": after["tokens"], "calib": calib, "recipe": recipe, "git": git_sha()[:7], "command": command,
            "seconds": round(report["run"].get("seconds", 0.0), 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a finished output folder (report.json + model.safetensors)")
    p.add_argument("--label", required=True)
    p.add_argument("--recipe", default=None)
    p.add_argument("--command", required=True, help="the command that wrote OUT, as run")
    p.add_argument("--calib", default="32x256")
    p.add_argument("--json", type=Path, default=REPORTS / "frontier_quant.json")
    args = p.parse_args(argv)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    row = row_from_run(Path(args.out), args.label, args.recipe, args.command, args.calib)
    write_text(args.json, json.dumps([r for r in rows if r["label"] != args.label] + [row], indent=2) + "\n")
    print(f"{row['label']}: ppl {row['ppl']:.3f}, {row['stored_bytes']} bytes")


if __name__ == "__main__":
    main()

"""How fast the CLI answers: wall time of `--help`, `--version`, `methods`, `methods NAME` and each
`COMMAND --help`, against `python -c "import typer"` measured in the same run (the floor any Typer
CLI pays). Each command runs in a fresh interpreter `--repeats` times; the median is reported.

    python benchmarks/cli_latency.py [--repeats 7] [--out reports] [--render]

Writes reports/cli_latency.json and reports/cli_latency.md. Target: every ratio <= 2.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import Report, arguments, environment, rerender, table

BASELINE = [sys.executable, "-c", "import typer"]
# What any Typer CLI pays to print help (typer builds its parameter adapters with pydantic): context
# for the ratios, since no Typer app answers faster than this.
MINIMAL_APP = [sys.executable, "-c", "import typer\napp = typer.Typer()\n@app.command()\ndef main(x: int = 1):\n"
               "    pass\napp(['--help'])"]
COMMANDS = [["--help"], ["--version"], ["methods"], ["methods", "saes-svd"],
            *[[c, "--help"] for c in ("analyze", "compress", "finetune", "eval", "run", "generate")]]
TARGET_RATIO = 2.0


def cli(argv: list[str]) -> list[str]:
    # -P: the repo's top-level kernels/ must not shadow an installed package (see README).
    return [sys.executable, "-P", "-m", "compressor.cli.main", *argv]


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"error: `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}")
    return seconds


def median_seconds(commands: dict[str, list[str]], repeats: int) -> dict[str, float]:
    """Median wall time per command; the commands take turns within each repeat, so a machine
    whose load drifts during the run slows all of them alike."""
    for command in commands.values():
        wall_seconds(command)  # warm the file cache; not counted
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            samples[name].append(wall_seconds(command))
    return {name: statistics.median(values) for name, values in samples.items()}


def render(result: dict) -> str:
    env, minimal, base = result["env"], result["minimal_app_s"], result["baseline_s"]
    rows = [[f"`compressor {r['command']}`", f"{r['seconds'] * 1000:.0f}", f"{r['ratio']:.2f}",
             "yes" if r["ratio"] <= TARGET_RATIO else "no"] for r in result["rows"]]
    return "\n".join([
        "# CLI latency", "",
        f"Median wall time of {result['repeats']} runs per command (taking turns), each in a fresh interpreter, "
        f"against `python -c \"import typer\"` ({base * 1000:.0f} ms) measured in the same run. Target: ratio <= "
        f"{TARGET_RATIO:g}. For context, a one-command Typer app printing its `--help` takes {minimal * 1000:.0f} ms "
        f"({minimal / base:.2f}× `import typer`), the floor of any Typer CLI.", "",
        f"Run {env['date']} on {env['host']} ({env['device_name']}), git {env['git_sha']}, python "
        f"{env['versions']['python']}.", "",
        *table(["command", "median ms", "ratio to `import typer`", "within target"], rows)]) + "\n"


def main(argv=None) -> None:
    parser = arguments(__doc__, threads=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "cli_latency", render))
    commands = {"baseline": BASELINE, "minimal": MINIMAL_APP, **{" ".join(a): cli(a) for a in COMMANDS}}
    medians = median_seconds(commands, args.repeats)
    baseline, minimal = medians.pop("baseline"), medians.pop("minimal")
    rows = [{"command": name, "seconds": seconds, "ratio": seconds / baseline} for name, seconds in medians.items()]
    for row in rows:
        print(f"compressor {row['command']:<18} {row['seconds'] * 1000:6.0f} ms  {row['ratio']:.2f}x", flush=True)
    report = Report(args.out, "cli_latency", render)
    report.state = {"benchmark": "cli_latency", "repeats": args.repeats, "baseline_s": baseline,
                    "minimal_app_s": minimal, "rows": rows, "env": environment()}
    report.write()


if __name__ == "__main__":
    main()

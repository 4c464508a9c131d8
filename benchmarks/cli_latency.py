"""How fast the CLI answers: wall time of `--help`, `--version`, `methods`, `methods NAME` and each
`COMMAND --help`, against `python -c "import typer"` measured in the same run (the floor any Typer
CLI pays). Each command runs in a fresh interpreter `--repeats` times; the median is reported.
"""

import os
import statistics
import subprocess
import sys
import time

from harness import Report, arguments, columns, environment, markdown, numbers, rerender

TARGET_RATIO = 2.0
# What any Typer CLI pays to print help (typer builds its parameter adapters with pydantic): context for the ratios.
MINIMAL_APP = "import typer\napp = typer.Typer()\n@app.command()\ndef main(x: int = 1):\n    pass\napp(['--help'])"
# -P: like the installed `compressor` script, the working directory stays off sys.path.
COMMANDS = {"baseline": [sys.executable, "-c", "import typer"], "minimal": [sys.executable, "-c", MINIMAL_APP],
            **{" ".join(argv): [sys.executable, "-P", "-m", "compressor.cli.main", *argv]
               for argv in [["--help"], ["--version"], ["methods"], ["methods", "saes-svd"],
                            *[[c, "--help"] for c in ("analyze", "compress", "finetune", "eval", "run", "generate")]]}}


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}")
    return time.perf_counter() - started


def median_seconds(repeats: int) -> dict[str, float]:
    """Median wall time per command; the commands take turns within each repeat, so a machine
    whose load drifts during the run slows all of them alike."""
    rounds = [{name: wall_seconds(command) for name, command in COMMANDS.items()} for _ in range(repeats + 1)]
    return {name: statistics.median(r[name] for r in rounds[1:]) for name in COMMANDS}  # round 0 only warms the cache


def render(result: dict) -> str:
    env, minimal, base = result["env"], result["minimal_app_s"], result["baseline_s"]
    return markdown(
        "# CLI latency",
        f"Median wall time of {result['repeats']} runs per command (taking turns), each in a fresh interpreter, "
        f"against `python -c \"import typer\"` ({base * 1000:.0f} ms) measured in the same run. Target: ratio <= "
        f"{TARGET_RATIO:g}. For context, a one-command Typer app printing its `--help` takes {minimal * 1000:.0f} ms "
        f"({minimal / base:.2f}× `import typer`), the floor of any Typer CLI.",
        f"Run {env['date']} on {env['host']} ({env['device_name']}), git {env['git_sha']}, python "
        f"{env['versions']['python']}.",
        columns([("command", "`compressor {command}`"), ("median ms", lambda r: f"{r['seconds'] * 1000:.0f}"),
                 ("ratio to `import typer`", "{ratio:.2f}"),
                 ("within target", lambda r: "yes" if r["ratio"] <= TARGET_RATIO else "no")], result["rows"]))


def main(argv=None) -> None:
    parser = arguments(__doc__, threads=None)
    numbers(parser, (("repeats", 7),))
    args = parser.parse_args(argv)
    if args.render:
        return print(rerender(args.out, "cli_latency", render))
    medians = median_seconds(args.repeats)
    baseline, minimal = medians.pop("baseline"), medians.pop("minimal")
    report = Report(args.out, "cli_latency", render)
    report.state = {"benchmark": "cli_latency", "repeats": args.repeats, "baseline_s": baseline,
                    "minimal_app_s": minimal, "env": environment(),
                    "rows": [{"command": name, "seconds": s, "ratio": s / baseline} for name, s in medians.items()]}
    report.write()
    print(render(report.state))


if __name__ == "__main__":
    main()

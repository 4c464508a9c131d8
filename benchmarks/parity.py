"""Behaviour snapshot for refactors: every number a refactor must leave unchanged, in one JSON.

Runs (1) the Q2 stories260K sweep of benchmarks/quality.py and (2) every recipe in recipes/ on the
embedded stories260K through the CLI, exactly as tests/test_recipes.py does, and records every
perplexity / metric of their reports plus the SHA-256 of each written weights file. Run it before
and after a restructuring commit and compare:

  python benchmarks/parity.py snapshot --out /tmp/before.json      (about 5 minutes, 1 thread)
  python benchmarks/parity.py snapshot --out /tmp/after.json
  python benchmarks/parity.py compare /tmp/before.json /tmp/after.json --md reports/parity.md

`compare` exits 1 when any number differs (exact float equality; the runs are seeded and single
threaded).
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import ROOT, markdown, table


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _numbers(value, prefix: str = "") -> dict[str, float]:
    """Every finite-or-not float/int leaf of a JSON value, keyed by its path."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(_numbers(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(_numbers(item, f"{prefix}[{i}]"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


# Report fields that measure the machine, not the model: they differ between any two runs.
_VOLATILE = ("seconds", "wall", "time", "memory", "mb", "mib", "peak", "rss", "tokens_per_s",
             "throughput", "eta", "elapsed", "started", "bytes_per_s")


def _stable(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].lower()
    return not any(word in leaf for word in _VOLATILE)


def snapshot_q2(work: Path) -> dict[str, float]:
    out = work / "q2"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "q2", "--out", str(out)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    q2 = json.loads((out / "quality_q2.json").read_text())
    numbers = {f"q2/{row['keep']}/{row['label']}/perplexity": float(row["ppl"]) for row in q2["rows"]}
    return {**numbers, "q2/dense/perplexity": float(q2["dense_ppl"])}


def snapshot_recipe(recipe: Path, work: Path) -> dict[str, object]:
    out = work / recipe.stem
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "compressor.cli.main", "run", str(recipe), "--out", str(out), "-q"],
        cwd=work, env=env, capture_output=True, text=True,
    )
    if result.returncode != 0:
        return {f"recipe/{recipe.stem}/exit_code": result.returncode}
    report = json.loads((out / "report.json").read_text())
    entry: dict[str, object] = {
        f"recipe/{recipe.stem}/{k}": v
        for k, v in _numbers({
            "evaluation": report.get("evaluation"), "gates": report.get("gates"),
            "size": report.get("size"),
            "stages": [{"metrics": s.get("metrics")} for s in report.get("stages", [])],
        }).items()
        if _stable(k)
    }
    for weights in sorted(out.rglob("*.safetensors")):
        entry[f"recipe/{recipe.stem}/sha256/{weights.relative_to(out)}"] = _sha256(weights)
    return entry


def snapshot(args: argparse.Namespace) -> int:
    numbers: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        work = Path(tmp)
        if not args.skip_q2:
            numbers.update(snapshot_q2(work))
            print(f"q2: {len(numbers)} numbers", flush=True)
        for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
            numbers.update(snapshot_recipe(recipe, work))
            print(f"{recipe.stem}: done", flush=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    Path(args.out).write_text(json.dumps({"git": git.stdout.strip(), "numbers": numbers}, indent=1))
    print(f"wrote {args.out}: {len(numbers)} values")
    return 0


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def compare(args: argparse.Namespace) -> int:
    before = json.loads(Path(args.before).read_text())
    after = json.loads(Path(args.after).read_text())
    b, a = before["numbers"], after["numbers"]
    # Values only in `after` come from a newer snapshot format (or a new recipe): listed, not failed.
    keys = sorted(b)
    differ = [k for k in keys if k not in a or not _same(b[k], a[k])]
    new = sorted(set(a) - set(b))
    shown = differ or [k for k in keys if k.endswith("perplexity")]
    text = markdown(
        f"# Parity: {before['git'][:7]} -> {after['git'][:7]}",
        f"{len(keys)} values compared (Q2 stories260K sweep perplexities; every recipe's report numbers and "
        f"weight-file SHA-256); **{len(keys) - len(differ)} identical, {len(differ)} differ**"
        + (f"; {len(new)} values only in the after snapshot (not compared)." if new else "."),
        table(["value", "before", "after"], [[k, b.get(k), a.get(k)] for k in shown]))
    if args.md:
        Path(args.md).write_text(text)
    print(text)
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot")
    snap.add_argument("--out", required=True)
    snap.add_argument("--skip-q2", action="store_true")
    comp = sub.add_parser("compare")
    comp.add_argument("before")
    comp.add_argument("after")
    comp.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    return snapshot(args) if args.command == "snapshot" else compare(args)


if __name__ == "__main__":
    sys.exit(main())

"""The one benchmark harness: protocol, row cache, provenance and report writing for benchmarks/.

A benchmark declares its rows (a label and the config that produces it), measures one row, and
renders its JSON (`render(state) -> str`); benchmarks/README.md describes what the harness gives it.
`python benchmarks/harness.py check` re-renders every report in REPORT_RENDERERS from its committed
JSON and compares the Markdown tables with the committed ones (exit 1 on a difference): the proof
that each report is regenerable by its command.
"""

import argparse
import importlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
SMOLLM2 = os.environ.get("COMPRESSOR_SMOLLM2", "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DATA = os.environ.get("COMPRESSOR_DATA", "/work/shared/data")


def wiki(data_dir: str = DATA) -> str:
    return str(Path(data_dir) / "wikitext-2" / "wiki.test.raw")


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def fmt(value, digits: int = 2, missing: str = "–") -> str:
    """A number for a table cell, or `missing` when absent / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; cells are str()-ed as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def columns(spec, rows) -> list[str]:
    """Markdown table lines from a column spec, (header, cell) pairs: a cell is a format template
    filled from the row ("{ppl:.3f}") or a function of the row."""
    def cell(how, row):
        return how.format_map(row) if isinstance(how, str) else how(row)

    return table([header for header, _ in spec], [[cell(how, row) for _, how in spec] for row in rows])


def markdown(*blocks) -> str:
    """A report's text: blocks (a line, or a list of lines; empty ones left out) separated by one blank line."""
    return "\n\n".join(b if isinstance(b, str) else "\n".join(b) for b in blocks if b) + "\n"


def pick(wanted: str | None, known: list[str]) -> list[str]:
    """The rows `--rows` names (all of `known` when it names none); exits on an unknown label."""
    labels = wanted.split(",") if wanted else list(known)
    unknown = [label for label in labels if label not in known]
    if unknown:
        sys.exit(f"error: unknown row label(s) {unknown}; choose from {','.join(known)}")
    return labels


# ---------------------------------------------------------------- provenance


def environment(seed: int = 0) -> dict:
    """collect_env (date, host, device, git sha, versions) plus the machine's load average."""
    import torch

    from compressor.report.env import collect_env

    return {**collect_env(torch.device("cpu"), seed), "loadavg": f"{os.getloadavg()[0]:.2f}"}


def provenance(env: dict) -> str:
    v = env.get("versions", {})
    return (f"Run {env.get('date')} on {env.get('host')} ({env.get('device_name')}), git "
            f"{env.get('git_sha')}, torch {v.get('torch')}, transformers {v.get('transformers')}.")


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


# ---------------------------------------------------------------- the protocol


def eval_windows(ctx, source: str, seq_len: int, num_windows: int | None):
    """The first `num_windows` windows of `seq_len` of the held-out (second) half of `source`."""
    return ctx.windows(source, split="eval", seq_len=seq_len, num_windows=num_windows)


def calib_fields(source: str, windows: int, seq_len: int, batch_size: int = 8) -> dict:
    """The calibration fields of a method config: windows of the first half of `source`."""
    return {"calibration": source, "num_windows": windows, "seq_len": seq_len, "batch_size": batch_size}


def apply_method(model, method: str, fields: dict, ctx):
    """Apply one registered method in place (its warnings silenced); (StageResult, config dict, seconds)."""
    from compressor.registry import get_method

    spec = get_method(method)
    config = spec.config_cls.from_dict(fields)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = spec.apply(model, config, ctx)
    return result, config.to_dict(), time.perf_counter() - started


def load(path: str | None, **context):
    """(LoadedModel, Context) of `path` (None: the embedded stories260K); Context is quiet."""
    from compressor.context import Context
    from compressor.models import load_model

    loaded = load_model(path)
    return loaded, Context(tokenizer=loaded.tokenizer, quiet=True, **context)


def sizes_of(args, keys=("calib_windows", "calib_seq", "eval_windows", "eval_seq")) -> dict:
    """The run's sizes: what every row's numbers depend on."""
    return {k: getattr(args, k) for k in keys}


def stored_bytes(model, value_bytes: int = 2) -> int:
    """Bytes of every stored tensor (state_dict, a shared storage once): floating values at
    `value_bytes` (bfloat16 = 2), integer buffers (packed indices, codes) at their own width."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * (value_bytes if tensor.is_floating_point() else tensor.element_size())
    return total


def finite(label: str, value: float) -> float:
    if not math.isfinite(value):
        sys.exit(f"error: row {label} gave a non-finite value {value}; nothing was written for it")
    return value


# ---------------------------------------------------------------- rows: the report is the cache


def row_key(label: str, config: dict) -> str:
    return json.dumps({"label": label, **config}, sort_keys=True, default=str)


class Report:
    """One report: its JSON state (rows included), the Markdown renderer, the row cache."""

    def __init__(self, out: Path, name: str, render, png=None, same=("label",)) -> None:
        """`same`: the row fields that name one row, label first (a label measured at several keeps:
        label, keep; the config holds the others)."""
        self.out, self.name, self.render, self.png, self.same = Path(out), name, render, png, same
        path = self.out / f"{name}.json"
        self.state = json.loads(path.read_text()) if path.is_file() else {"rows": []}
        for row in self.state.get("rows", []):  # each row keeps the provenance of the run that measured it
            row.setdefault("run", {k: (self.state.get("env") or {}).get(k) for k in ("date", "git_sha")})

    def begin(self, sizes: dict, **fields) -> None:
        """Start a run measured with `sizes`: a report of other sizes starts afresh (a report states
        one set of sizes); `fields` (env, model, ...) describe this run."""
        if self.state.get("sizes") != sizes:
            self.state = {"rows": []}
        self.state.update(fields, sizes=sizes)

    def cached(self, label: str, config: dict, force: bool = False) -> dict | None:
        """The row of `label` whose config is `config`, unless `force`."""
        key, sizes = row_key(label, config), self.state.get("sizes") or {}
        for row in [] if force else self.state.get("rows", []):
            # a row written before keys existed: measured with the report's sizes (and at its `same` fields)
            same = row["key"] == key if "key" in row else bool(sizes) and all(
                config.get(k) == v for k, v in sizes.items()) and all(
                row.get(k) == config.get(k) for k in self.same[1:])
            if row.get("label") == label and same:
                return row
        return None

    def add(self, label: str, config: dict, row: dict) -> dict:
        """Replace the row of `label` (and the other `same` fields) with `row`, keyed by `config`;
        rewrite the report."""
        run = {k: (self.state.get("env") or {}).get(k) for k in ("date", "git_sha")}
        row = {"label": label, **row, "key": row_key(label, config), "run": run}
        kept = [r for r in self.state.get("rows", []) if any(r.get(k) != row.get(k) for k in self.same)]
        self.state["rows"] = kept + [row]
        self.write()
        return row

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(self.out / f"{self.name}.json", json.dumps(self.state, indent=1, default=str) + "\n")
        write_text(self.out / f"{self.name}.md", self.render(self.state))
        if self.png is not None:
            self.png(self.state, self.out / f"{self.name}.png")


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: never half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    temp.replace(path)


def rerender(out: Path, name: str, render, png=None) -> str:
    """Rebuild <out>/<name>.md (and .png) from <out>/<name>.json; returns the Markdown."""
    path = Path(out) / f"{name}.json"
    if not path.is_file():
        sys.exit(f"error: `{path}` not found; run the benchmark first (without --render)")
    state = json.loads(path.read_text())
    write_text(path.with_suffix(".md"), render(state))
    if png is not None:
        png(state, path.with_suffix(".png"))
    return path.with_suffix(".md").read_text()


def arguments(doc: str, *, smollm2=False, data=False, threads: int | None = 1, rows=False):
    """An ArgumentParser with the flags every benchmark shares."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if smollm2:
        p.add_argument("--smollm2", default=SMOLLM2, help="SmolLM2-135M GGUF (COMPRESSOR_SMOLLM2)")
    if data:
        p.add_argument("--data-dir", default=DATA, help="folder of wikitext-2/, stsb/ ... (COMPRESSOR_DATA)")
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help="torch threads")
    if rows:
        p.add_argument("--rows", default=None, help="comma-separated row labels (default: all)")
        p.add_argument("--force", action="store_true", help="rerun rows whose config is unchanged")
    p.add_argument("--render", action="store_true", help="only rebuild the .md/.png from the .json")
    p.add_argument("--out", default=str(REPORTS))
    return p


def numbers(parser, defaults) -> None:
    """Numeric flags from (flag, default) pairs: the default's type (int when the default is None)."""
    for flag, default in defaults:
        parser.add_argument(f"--{flag}", type=int if default is None else type(default), default=default)


def run_worker(script: str, argv: list[str]) -> dict:
    """Run `script` in a fresh interpreter (so its memory readings are its own); the JSON object
    its last stdout line holds."""
    import subprocess

    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"error: worker `{' '.join(argv)}` failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def need_file(path: str, flag: str) -> None:
    if not Path(path).is_file():
        sys.exit(f"error: `{path}` not found; pass {flag}")


# ---------------------------------------------------------------- check: every report regenerable

# (script, report name, renderer in the script): every report a script writes from its JSON.
REPORT_RENDERERS = [
    ("quality", "quality_q1", "render_lm"), ("quality", "quality_q1_eval32k", "render_lm"),
    ("quality", "quality_q2", "render_lm"), ("quality", "quality_q3", "render_q3"),
    ("quality", "quality_q4", "render_q4"),
    ("frontier", "frontier", "render"), ("frontier", "frontier_stories", "render"),
    ("frontier", "p2_allocation", "p2_markdown"), ("frontier", "p2_allocation_stories", "p2_markdown"),
    ("quant_smollm2", "quant_smollm2", "render"), ("quant_peer", "quant_peer", "render"),
    ("sparse_p1", "sparse_p1", "render"), ("sparse_p1", "sparse_p1_ds", "render"),
    ("sparse_p1", "sparse_p1_heal1", "render"), ("sparse_p1", "sparse_p1_heal2", "render"),
    ("sparse_p1", "sparse_p1_heal3", "render"), ("sparse_p1", "sparse_p1_peer", "render"),
    ("dense_sparse", "dense_sparse_ds", "render_ds"), ("dense_sparse", "dense_sparse_ds_stf100", "render_ds"),
    ("dense_sparse", "dense_sparse_ds_stf_lr1e-3", "render_ds"),
    ("dense_sparse", "dense_sparse_stories", "render_ds"),
    ("dense_sparse", "dense_sparse_maestro", "render_maestro"),
    ("dense_sparse", "dense_sparse_stories_maestro", "render_maestro"),
    ("dense_sparse", "dense_sparse_minilm", "render_minilm"),
    ("decode_speed", "decode_speed", "render"), ("decode_speed", "decode_speed_quant", "render"),
    ("decode_speed", "decode_speed_rerun_b1", "render"),
    ("finetune_sst2", "finetune_sst2", "render_f2"), ("finetune_sst2", "finetune_params", "render_f3"),
    ("finetune_sst2", "kappatune_forgetting", "render_f5"),
    ("finetune_memory", "finetune_memory", "render"), ("sorted_exits", "finetune_sorted", "render"),
    ("offload", "offload", "render"), ("ship_bytes", "ship_bytes", "render"),
    ("cli_latency", "cli_latency", "render"),
]


def table_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith("|")]


def check(reports: Path = REPORTS) -> int:
    """Render every report of REPORT_RENDERERS from its JSON; compare tables with the committed .md."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    failed = 0
    for script, name, renderer in REPORT_RENDERERS:
        state = json.loads((reports / f"{name}.json").read_text())
        module = importlib.import_module(script)
        fresh = table_lines(getattr(module, renderer)(state))
        committed = table_lines((reports / f"{name}.md").read_text())
        same = fresh == committed and bool(fresh)
        failed += not same
        print(f"{'same' if same else 'DIFFERS'}  {name}.md  ({len(committed)} table lines; "
              f"python benchmarks/{script}.py ... --render)")
        if not same:
            for a, b in zip(committed + ["<end>"] * len(fresh), fresh + ["<end>"] * len(committed)):
                if a != b:
                    print(f"    committed: {a}\n    rendered:  {b}")
                    break
    print(f"{len(REPORT_RENDERERS) - failed} of {len(REPORT_RENDERERS)} reports regenerate their tables")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["check"]:
        sys.exit("usage: python benchmarks/harness.py check")
    sys.exit(check())

"""`compressor compare`: several checkpoints of one model and their source, side by side.

Every row is measured again here, under one protocol, so the numbers are comparable: held-out
perplexity with `compressor.evaluation` (the windows and code of `compressor eval`), lm-eval task
scores through the bridge (optional), and CPU decode speed at batch 1 (optional). Sizes come from
the files: on-disk bytes of the weight files and parameters of the loaded model. Method and
settings come from the checkpoint's own record (config.json's quantization_config, else report.json).
The frontier plot marks the Pareto front: the rows no other row beats on both bytes and quality.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from . import evaluation
from .errors import ConfigError
from .models import DEFAULT_MODEL_DIR, load_model
from .offload import input_device
from .registry import get_method
from .report.size import model_size, weight_file_bytes

# Shown for every stage that has them, whatever their value: they name the variant.
HEADLINE_FIELDS = ("rank", "keep_bytes", "pattern", "sparsity", "score", "allocation", "r", "steps", "lr")
# Calibration and bookkeeping fields: how a variant was made, not which variant it is.
QUIET_FIELDS = {"calibration", "num_windows", "seq_len", "batch_size", "second_phase", "targets", "ignore",
                "data", "text_column", "eval_data", "num_eval", "eval_every", "log_every", "checkpoint_every",
                "resume", "seed"}
SORT_KEYS = ("bytes", "perplexity", "parameters", "name", "tokens_per_s")
DECODE_TOKENS = 32  # new tokens per speed repeat
DECODE_REPEATS = 3


# -- what a checkpoint is -------------------------------------------------------------------------


def source_path(source: str | None) -> str:
    """The folder (or id) a recorded `source_model` names; `default` is the embedded model."""
    return str(DEFAULT_MODEL_DIR) if source in (None, "", "default", "None") else str(source)


def read_record(path: Path) -> dict[str, Any]:
    """{method, stages, source} from a checkpoint's config.json quantization_config, else its
    report.json; a plain model folder is `dense` and its own source."""
    config = _json(path / "config.json") if path.is_dir() else {}
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "compressor":
        return {"method": quant.get("method", "?"), "stages": quant.get("stages", []),
                "source": source_path(quant.get("source_model"))}
    report = _json(path / "report.json") if path.is_dir() else {}
    stages = [{"method": s["stage"], **s.get("config", {})} for s in report.get("stages", [])]
    if stages:
        return {"method": " -> ".join(s["method"] for s in stages), "stages": stages,
                "source": source_path(report.get("run", {}).get("model"))}
    return {"method": "dense", "stages": [], "source": str(path)}


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def settings(stages: list[dict[str, Any]]) -> str:
    """`rank=0.8` style: each stage's headline fields and every other non-default field."""
    parts = []
    for stage in stages:
        try:
            defaults = get_method(stage["method"]).config_cls().to_dict()
        except (ConfigError, TypeError):  # a plug-in method not installed here: show what was recorded
            defaults = {}
        shown = [k for k in stage if k != "method" and k not in QUIET_FIELDS and
                 (k in HEADLINE_FIELDS or k not in defaults or stage[k] != defaults[k])]
        parts.append(", ".join(f"{k}={_short(stage[k])}" for k in shown) or "defaults")
    return "; ".join(parts) or "-"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def baseline_of(records: dict[str, dict], baseline: str | None) -> str:
    """The `--baseline` given, else the one source every checkpoint records."""
    if baseline is not None:
        return str(baseline)
    sources = []
    for record in records.values():
        if not any(same_model(record["source"], s) for s in sources):
            sources.append(record["source"])
    if len(sources) > 1:
        raise ConfigError(f"the checkpoints come from {len(sources)} different source models ({', '.join(sources[:3])}); "
                          "compare variants of one model, or name the reference with --baseline DIR")
    return sources[0]


def compare_models(paths: list[str], *, baseline: str | None = None, device="cpu", data: str = "default",
                   tasks: list[str] = (), tasks_dir: str | None = None, speed: bool = False,
                   sort: str = "bytes", quiet: bool = False) -> list[dict[str, Any]]:
    """One measured row per checkpoint plus the baseline's (`baseline: True`), sorted by `sort`."""
    check_sort_key(sort, list(tasks), speed)
    missing = [p for p in paths if not Path(p).expanduser().exists()]
    if missing:
        raise ConfigError(f"`{missing[0]}` does not exist; pass checkpoint folders written by compress / finetune / "
                          "run (or model folders)")
    manager = None
    if tasks:
        from .lm_eval_bridge import check_tasks

        manager = check_tasks(list(tasks), tasks_dir)
    records = {str(p): read_record(Path(p).expanduser()) for p in paths}
    base = baseline_of(records, baseline)
    options = {"device": device, "data": data, "tasks": list(tasks), "tasks_dir": tasks_dir, "speed": speed,
               "task_manager": manager, "quiet": quiet}
    base_record = read_record(Path(base)) if Path(base).exists() else {"method": "dense", "stages": []}
    rows = [{**measure(base, Path(base.rstrip("/")).name, base_record["method"], settings(base_record["stages"]),
                       **options), "baseline": True}]
    for path, record in records.items():
        if not same_model(path, base):
            rows.append({**measure(path, Path(path.rstrip("/")).name, record["method"], settings(record["stages"]),
                                   **options), "baseline": False})
    add_ratios(rows, rows[0])
    return sort_rows(rows, sort)


# -- measuring one row ----------------------------------------------------------------------------


def measure(path: str, label: str, method: str, setting: str, *, device, data: str, tasks: list[str],
            tasks_dir: str | None, speed: bool, task_manager=None, quiet: bool = False) -> dict[str, Any]:
    """Load one model and measure everything asked; the model is freed before the next row."""
    loaded = load_model(None if path == str(DEFAULT_MODEL_DIR) else path, device=device)
    if not loaded.causal:
        raise ConfigError(f"`{label}` is not a causal LM; compare measures perplexity and needs causal LMs")
    windows = evaluation.heldout_windows(loaded.tokenizer, data)
    ppl = evaluation.perplexity(loaded.model, windows, batch_size=evaluation.PROTOCOL["batch_size"])
    row = {"name": label, "path": path, "method": method, "settings": setting, "bytes": weight_file_bytes(path),
           "parameters": model_size(loaded.model, torch.float32)["parameters"], "perplexity": ppl["perplexity"]}
    if tasks:
        from .lm_eval_bridge import flat_scores, task_scores

        row.update(flat_scores(task_scores(loaded.model, loaded.tokenizer, tasks, tasks_dir=tasks_dir,
                                           manager=task_manager, quiet=quiet)))
    if speed:
        row["tokens_per_s"] = decode_tokens_per_s(loaded.model, windows[:1, :16])
    return row


@torch.no_grad()
def decode_tokens_per_s(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = DECODE_TOKENS,
                        repeats: int = DECODE_REPEATS) -> float:
    """Greedy decode speed at batch 1 (median of `repeats`, after one warm-up), new tokens per second."""
    model.eval()
    prompt = prompt.to(input_device(model))
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": getattr(model.config, "eos_token_id", None) or 0}
    model.generate(prompt, **kwargs)  # warm-up: first-call allocations are not decode speed
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        rates.append(new_tokens / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates)


# -- the table ------------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """bytes and parameters as a fraction of the baseline's (None where a size is unknown)."""
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / baseline["bytes"] if row["bytes"] and baseline["bytes"] else None
        row["params_ratio"] = row["parameters"] / baseline["parameters"] if baseline["parameters"] else None


def sort_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rows by `key` (ascending; task scores and tokens/s descending: best first)."""
    descending = key == "tokens_per_s" or "/" in key
    missing = [r for r in rows if r.get(key) is None]
    present = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key], reverse=descending)
    return present + missing


def check_sort_key(key: str, tasks: list[str], speed: bool) -> None:
    if key in SORT_KEYS and (key != "tokens_per_s" or speed):
        return
    if "/" in key and key.split("/", 1)[0] in tasks:
        return
    extra = " (with --speed)" if key == "tokens_per_s" else ""
    raise ConfigError(f"`--sort {key}` is not a column{extra}; use one of {', '.join(SORT_KEYS)} or TASK/METRIC "
                      "of a task given with --tasks (e.g. tinystories_cloze/acc)")


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = False) -> list[int]:
    """Indices of the points that no other point beats: at most as many bytes and at least as good
    quality, better in one of them. Points with a non-finite coordinate are never on the front."""
    def better_or_equal(a, b):  # a dominates-or-ties b
        quality = a[1] >= b[1] if higher_is_better else a[1] <= b[1]
        return a[0] <= b[0] and quality

    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    return [i for i in finite
            if not any(better_or_equal(points[j], points[i]) and points[j] != points[i] for j in finite if j != i)]


def markdown(rows: list[dict[str, Any]], columns: list[str], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    return str(value)


def columns_for(rows: list[dict[str, Any]]) -> list[str]:
    base = ["name", "method", "settings", "bytes", "bytes_ratio", "parameters", "params_ratio", "perplexity"]
    extra = [k for k in rows[0] if "/" in k and not k.endswith("_stderr")]
    return base + extra + (["tokens_per_s"] if any("tokens_per_s" in r for r in rows) else [])


def plot_frontier(rows: list[dict[str, Any]], metric: str, path: Path, model_name: str) -> None:
    """Quality (perplexity, log scale, or a task score) against on-disk MB, Pareto front marked."""
    from .report.plots import _pyplot, _save

    plt = _pyplot()
    higher = metric != "perplexity"
    usable = [r for r in rows if r.get("bytes") and r.get(metric) is not None]
    points = [(r["bytes"] / 1e6, float(r[metric])) for r in usable]
    front = sorted(pareto_front(points, higher), key=lambda i: points[i][0])
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (row, point) in enumerate(zip(usable, points)):
        is_base = row.get("baseline", False)
        ax.scatter(*point, marker="*" if is_base else "o", s=220 if is_base else 60, zorder=4,
                   color="black" if is_base else "tab:blue", label="source model (dense)" if is_base else None)
        ax.annotate(row["name"], point, textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.scatter([], [], marker="o", color="tab:blue", label="checkpoint")
    if front:
        xs, ys = zip(*(points[i] for i in front))
        # steps-post: the best quality reachable within x bytes holds until the next front point
        ax.plot(xs, ys, color="tab:red", linestyle="--", drawstyle="steps-post", zorder=3)
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="tab:red", linewidths=1.5, zorder=5,
                   label="Pareto front (no other row is smaller and better)")
    if not higher:
        ax.set_yscale("log")
    ax.set_xlabel("on-disk size of the weight files (MB)")
    ax.set_ylabel("held-out perplexity (log scale, lower is better)" if not higher
                  else f"{metric} (fraction, higher is better)")
    ax.set_title(f"{model_name}: {'held-out perplexity' if not higher else metric} vs on-disk bytes", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)

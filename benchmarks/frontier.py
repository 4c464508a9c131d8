"""The frontier: held-out perplexity against stored bytes for SmolLM2-135M (BENCHMARKS §P).

Rows: svd-llm and saes-svd with uniform and activation-aware ranks at keep 0.8 / 0.6 / 0.4, each with and without
`heal` (distillation from the dense model's logits), plus dense. Calibration and healing read the first half of
wikitext-2 wiki.test.raw, perplexity the second half (disjoint). Stored bytes: every stored value as bfloat16 (2
bytes; embeddings and lm_head included, a tied matrix once), integer buffers (packed positions, codes) at their size.
"""

import copy
import json
import math
import time
from pathlib import Path

from harness import (REPORTS, Report, apply_method, arguments, calib_fields, columns, environment, eval_windows,
                     load, log, markdown, need_file, numbers, pick, sizes_of, stored_bytes, wiki, write_text)

METHODS = ("saes-svd", "svd-llm")
KEEPS = (0.6, 0.4, 0.8)
AWARE_KNOBS = {"aware_loss": str, "aware_group": str, "rank_spread": float}  # flags of the aware rows
OUT = REPORTS  # --out: where the reports are written and the other scripts' rows are read


def all_labels() -> list[str]:
    """P2's rows first (keep 0.6 and 0.4, uniform vs aware), then keep 0.8, then the healed ones (the heal
    target, saes-svd keep 0.6, first)."""
    plain = [f"{m}-{a}-{k}" for k in KEEPS for m in METHODS for a in ("uniform", "aware")]
    return ["dense", *plain, *[f"{m}-{a}-{k}+heal" for k in KEEPS for m in METHODS for a in ("aware", "uniform")]]


def parse_label(label: str) -> dict:
    base, _, heal = label.partition("+")
    if base == "dense":
        return {"method": "dense", "heal": False}
    method, allocation, keep = base.rsplit("-", 2)
    return {"method": method, "allocation": allocation, "keep": float(keep), "heal": heal == "heal"}


def sizes_and_heal_arguments(p, heal_steps: int) -> None:
    """The protocol's sizes and heal's budget flags (benchmarks/sparse_p1.py heals the same way)."""
    numbers(p, (("calib-windows", 32), ("calib-seq", 256), ("eval-windows", 16), ("eval-seq", 512),
                ("heal-steps", heal_steps), ("heal-batch", 4), ("heal-seq", 256), ("heal-lr", 3e-4),
                ("heal-lora-r", 0), ("heal-eval-every", 0)))
    p.add_argument("--heal-loss", default="kl", choices=("kl", "lm"))


def run(args, report: Report) -> None:
    labels = pick(args.rows, all_labels())
    data = "embedded TinyStories" if args.stories else "wikitext-2 wiki.test.raw"
    source = "default" if args.stories else wiki(args.data_dir)
    loaded, ctx = load(None if args.stories else args.smollm2)
    windows = eval_windows(ctx, source, args.eval_seq, args.eval_windows)
    sizes = {**sizes_of(args), **sizes_of(args, ("heal_steps", "heal_batch", "heal_seq", "heal_lr"))}
    report.begin(sizes, benchmark="frontier", env=environment(), data=data,
                 model="stories260K (embedded)" if args.stories else Path(args.smollm2).name)
    calib = f"{data} first half: {args.calib_windows}x{args.calib_seq} tokens"
    configs = {lab: row_config(lab, sizes, args) for lab in labels}
    todo = [lab for lab in labels if report.cached(lab, configs[lab], args.force) is None]
    for base in dict.fromkeys(lab.partition("+")[0] for lab in todo):  # a healed row heals its base's model
        spec = parse_label(base)
        model, info = (loaded.model, {}) if base == "dense" else compress(loaded.model, spec, source, args, ctx)
        if base in todo:
            report.add(base, configs[base], point(model, windows, calib, spec, info))
        if f"{base}+heal" in todo:
            healed = heal_row(model, loaded.model, source, args, ctx, windows)
            report.add(f"{base}+heal", configs[f"{base}+heal"], point(model, windows, calib, spec, info, healed))


def row_config(label: str, sizes: dict, args) -> dict:
    """What a row's numbers depend on: the run's sizes, aware rows' allocation knobs, heal's loss."""
    spec = parse_label(label)
    return {**sizes, **aware_knobs(spec, args, set_only=False),
            **{k: getattr(args, k) for k in (("heal_loss", "heal_lora_r") if spec["heal"] else ())}}


def aware_knobs(spec: dict, args, set_only: bool = True) -> dict:
    """The aware rows' allocation flags (those given, with `set_only`)."""
    return {k: getattr(args, k) for k in AWARE_KNOBS
            if spec.get("allocation") == "aware" and not (set_only and getattr(args, k) is None)}


def compress(dense, spec: dict, source: str, args, ctx):
    """A compressed copy of `dense` and what its row records of the compression."""
    fields = {"rank": spec["keep"], "allocation": spec["allocation"], **aware_knobs(spec, args),
              **({"update": "false"} if spec["method"] == "svd-llm" else {}),
              **calib_fields(source, args.calib_windows, args.calib_seq)}
    model = copy.deepcopy(dense)
    result, config, seconds = apply_method(model, spec["method"], fields, ctx)
    info = {"compress_seconds": round(seconds, 1), "keep_ratio_reached": result.metrics["keep_ratio_reached"],
            "layers_dense": result.metrics["layers_dense"], "notes": result.notes, "config": config}
    log(f"{spec['method']}: compressed in {info['compress_seconds']} s, keep reached {info['keep_ratio_reached']:.4f}")
    return model, info


def heal_row(model, dense, source: str, args, ctx, eval_windows) -> dict:
    """Heal `model` in place (distillation from `dense` with --heal-loss kl): the row's heal budget and curve."""
    from compressor.adapters.heal import HealConfig, heal
    from compressor.evaluation import perplexity

    config = HealConfig(loss=args.heal_loss, data=source, steps=args.heal_steps, batch_size=args.heal_batch,
                        seq_len=args.heal_seq, lr=args.heal_lr, warmup_steps=min(10, args.heal_steps // 4),
                        num_eval=8 if args.heal_eval_every else 2, eval_every=args.heal_eval_every,
                        lora_r=args.heal_lora_r, log_every=1000)
    started, calls = time.perf_counter(), []

    def progress(model) -> dict:  # the frontier's own held-out perplexity, logged as it comes
        calls.append(perplexity(model, eval_windows)["perplexity"])
        log(f"heal eval {len(calls) - 1}: perplexity {calls[-1]:.3f} ({time.perf_counter() - started:.0f} s)")
        return {"perplexity": calls[-1]}

    result = heal(model, config, ctx, teacher=dense if args.heal_loss == "kl" else None,
                  eval_fn=progress if args.heal_eval_every else None)
    every, metrics = args.heal_eval_every, result.metrics
    curves = {k: v for k, v in result.curves.items() if k.startswith("eval_") and v}
    budget = ("loss", "steps", "batch_size", "seq_len", "lr", "schedule", "lora_r")
    info = {"heal_seconds": round(time.perf_counter() - started, 1), "heal": {k: config.to_dict()[k] for k in budget},
            "heal_curve": {k: sorted({(s, v[s]) for s in [*range(0, len(v), every or len(v)), len(v) - 1]})
                           for k, v in curves.items()},
            "heal_trainable_params": metrics["method_params"], "heal_loss_first": metrics["train_loss_first"],
            "heal_loss_last": metrics["train_loss_last"]}
    log(f"healed in {info['heal_seconds']} s, loss {info['heal_loss_first']:.3f} -> {info['heal_loss_last']:.3f}")
    return info


def point(model, windows, calib: str, spec: dict, info: dict, heal_info: dict | None = None) -> dict:
    """A frontier row: bytes and held-out perplexity of `model`, with its compression (and heal) info."""
    from compressor.evaluation import perplexity

    ppl = perplexity(model, windows)
    out = {"method": spec["method"], "heal": heal_info is not None, "stored_bytes": stored_bytes(model),
           "ppl": ppl["perplexity"], "eval_tokens": ppl["tokens"], "calib": calib,
           **{k: spec[k] for k in ("allocation", "keep") if k in spec}}
    log(f"{spec['method']}: ppl {out['ppl']:.3f}, {out['stored_bytes'] / 2**20:.1f} MiB")
    return {**out, **info, **(heal_info or {})}


# source -> (file in reports/, on the project's Pareto front): rows drawn beside the low-rank ones.
SOURCES = {"sparse": ("frontier_sparse.json", True), "quant": ("quant_smollm2.json", True),
           "quant-budget": ("frontier_quant.json", True), "llm-compressor": ("quant_peer.json", False)}


def source_rows(source: str, data) -> list[dict]:
    """A report's rows in the frontier schema (label, method, heal, stored_bytes, ppl, eval_tokens)."""
    rows = [r for r in (data["rows"] if isinstance(data, dict) else data) if r["label"] != "dense"]
    if source == "quant":  # bytes: the bf16 model.safetensors on disk
        rows = [{"label": r["label"], "method": r["label"].split("-")[0], "heal": False,
                 "stored_bytes": r["disk_bytes"], "ppl": r["ppl"], "eval_tokens": r["eval_tokens"]} for r in rows]
    if source == "llm-compressor":
        rows = [{"label": f"llm-compressor {r['label']}", "method": "llm-compressor", "heal": False,
                 "stored_bytes": r["stored_bytes"], "ppl": r["ppl"], "eval_tokens": data["eval_tokens_scored"]}
                for r in rows]
    return [{**r, "source": source} for r in rows]


def all_rows(state: dict) -> list[dict]:
    """The low-rank rows, then every other source's (SmolLM2 frontier only), then the GGUF point."""
    rows = [{**r, "source": r.get("source", "lowrank")} for r in state["rows"]]
    for source, (name, _) in ({} if suffix(state) else SOURCES).items():
        if (OUT / name).is_file():
            rows += source_rows(source, json.loads((OUT / name).read_text()))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense and state.get("gguf_bytes"):
        rows.append({"label": Path(state.get("gguf", "")).name, "method": "Q4_1 (GGUF)", "heal": False,
                     "source": "gguf", "stored_bytes": state["gguf_bytes"], "ppl": dense["ppl"],
                     "eval_tokens": dense["eval_tokens"]})
    return rows


def card_method(r: dict) -> str:
    """Which of the card's methods a point uses: low-rank factors / corrections, N:M sparsity."""
    low_rank = (r["method"] in (*METHODS, "dsformer") or "-r" in r["label"].split("-g")[-1]
                or bool(r.get("corrections")))  # a target_bytes point that bought low-rank corrections
    nm = ":" in r["label"] or r["method"] == "dsformer" or r["method"].startswith("prune")
    return " + ".join([name for name, used in (("low rank", low_rank), ("N:M", nm)) if used]) or "–"


def pareto(rows: list[dict]) -> set[str]:
    """Labels of the project's points no other project point beats on both bytes and perplexity."""
    own = [r for r in rows if r["source"] in ("lowrank", *[s for s, (_, on) in SOURCES.items() if on])]
    return {r["label"] for r in own if not any(o["stored_bytes"] <= r["stored_bytes"] and o["ppl"] < r["ppl"]
                                                or o["stored_bytes"] < r["stored_bytes"] and o["ppl"] <= r["ppl"]
                                                for o in own)}


def render_all(state: dict) -> None:
    """frontier[_stories].md/png and, when the rows hold uniform/aware pairs, p2_allocation[_stories]."""
    state.setdefault("data", "wikitext-2 wiki.test.raw")  # runs before the key existed
    write_text(OUT / f"frontier{suffix(state)}.md", render(state))
    plot(state, OUT / f"frontier{suffix(state)}.png")
    pairs = p2_pairs(state["rows"])
    if pairs:
        p2 = {"env": state.get("env"), "sizes": state.get("sizes"), "pairs": pairs, "model": state.get("model"),
              "data": state.get("data"), "p2_history": state.get("p2_history", []), "suffix": suffix(state)}
        write_text(OUT / f"p2_allocation{suffix(state)}.json", json.dumps(p2, indent=1, default=str))
        write_text(OUT / f"p2_allocation{suffix(state)}.md", p2_markdown(p2))


def suffix(state: dict) -> str:
    """"_stories" for the stories260K frontier's files, "" for SmolLM2's."""
    return "_stories" if str(state.get("model", "")).startswith("stories") else ""


def series_name(r: dict) -> str:
    name = r["method"] + (f" {r['allocation']}" if r.get("allocation") else "")
    name += " target_bytes" if r.get("source") == "quant-budget" and r["method"] == "gptq" else ""
    name += " + low-rank corrections" if r.get("corrections") else ""
    return name + (" + heal" if r["heal"] else "")


# the points drawn apart from the project's series: (source or method, legend, style)
MARKERS = (("llm-compressor", "llm-compressor 0.14 (peer)", {"marker": "x", "s": 90, "color": "crimson", "zorder": 6}),
           ("gguf", "Q4_1 GGUF source", {"marker": "P", "s": 140, "color": "darkorange", "zorder": 6}),
           ("dense", "dense (reference)", {"marker": "*", "s": 220, "color": "black", "zorder": 5}))


def plot(state: dict, path: Path) -> None:
    from compressor.report.plots import _pyplot, _save  # headless pyplot; tight layout, 110 dpi, closed

    rows = all_rows(state)
    front = pareto(rows)
    own = [r for r in rows if r["source"] not in ("llm-compressor", "gguf") and r["method"] != "dense"]
    marker = dict(zip(sorted({r["method"] for r in own}), "os^vD<>pPXh" * 3))  # one marker per method
    fig, ax = _pyplot().subplots(figsize=(9, 6))
    for name in sorted({series_name(r) for r in own}):
        series = [r for r in own if series_name(r) == name]
        points = sorted((r["stored_bytes"] / 1e6, r["ppl"]) for r in series)
        healed = series[0]["heal"]  # healed: hollow markers, dashed line
        ax.plot(*zip(*points), marker=marker[series[0]["method"]], linestyle="--" if healed else "-",
                fillstyle="none" if healed else "full", alpha=0.8,
                label=name + (" [card]" if card_method(series[0]) != "–" else ""))
    front_points = sorted((r["stored_bytes"] / 1e6, r["ppl"]) for r in rows if r["label"] in front)
    if front_points:
        ax.step(*zip(*front_points), where="post", color="grey", linewidth=3, alpha=0.35, label="project Pareto front")
    for key, label, style in MARKERS:
        points = [r for r in rows if (r["method"] if key == "dense" else r["source"]) == key]
        if points:
            ax.scatter([r["stored_bytes"] / 1e6 for r in points], [r["ppl"] for r in points], label=label, **style)
    ax.set(yscale="log", xlabel="stored bytes (MB, bfloat16 values, embeddings included)",
           ylabel="held-out perplexity (log scale)")
    ax.set_title(f"{state.get('model', '?')}, {state.get('data', '?')}: perplexity vs stored bytes", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def render(state: dict) -> str:
    env, s, rows = state.get("env") or {}, state.get("sizes") or {}, all_rows(state)
    front = pareto(rows)
    dense = next((r["stored_bytes"] for r in rows if r["method"] == "dense"), None)
    spec = [("label", "{label}"), ("method", "{method}"), ("heal", heal_budget),
            ("stored MB", lambda r: f"{r['stored_bytes'] / 1e6:.4g}"),
            ("bytes / dense", lambda r: f"{r['stored_bytes'] / dense:.3f}" if dense else "–"),
            ("perplexity", "{ppl:.2f}"), ("eval tokens", "{eval_tokens}"), ("source", "{source}"),
            ("card method", card_method), ("Pareto", lambda r: "yes" if r["label"] in front else "")]
    others = "" if suffix(state) else (
        " Rows from reports/frontier_sparse.json (pruning, benchmarks/sparse_p1.py) are marked `sparse`; "
        "reports/quant_smollm2.json `quant` (bytes: its bf16 model.safetensors on disk); reports/frontier_quant.json "
        "`quant-budget` when present; reports/quant_peer.json `llm-compressor` (a separate marker, not on the "
        "project's front); `gguf`: the GGUF file's bytes; its dequantization is the dense model, so the dense "
        "perplexity. `Pareto`: on the front of the project's own points (lowrank, sparse, quant). `card method`: "
        "points using low-rank factors / corrections or N:M sparsity.")
    return markdown(
        f"# Frontier: held-out perplexity vs stored bytes ({state.get('model')}, {state.get('data')})",
        f"Run {env.get('date', '?')} on {env.get('host', '?')} ({env.get('device_name', '?')}), git "
        f"{env.get('git_sha', '?')}. Calibration and healing: first half of {state.get('data')} "
        f"({s.get('calib_windows')}×{s.get('calib_seq')} calibration tokens); perplexity: "
        f"{s.get('eval_windows')} windows × {s.get('eval_seq')} of the second half. Heal: AdamW on the "
        "factors, cosine schedule, budget per row in the heal column (steps × batch×seq tokens; kl = "
        "distillation from the dense logits, the teacher run alongside). Bytes: every stored value as bfloat16 "
        "(2 bytes), embeddings/lm_head included (tied once), packed index buffers at their size." + others,
        [f"- {note}" for note in state.get("notes", [])], f"![frontier](frontier{suffix(state)}.png)",
        columns(spec, sorted(rows, key=lambda r: (-r["stored_bytes"], r["ppl"]))), heal_gap_lines(rows))


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
    dense, lines = by.get("dense"), []
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
    by, pairs = {r["label"]: r for r in rows}, []
    for method, keep in [(m, k) for m in METHODS for k in KEEPS]:
        u, a = by.get(f"{method}-uniform-{keep}"), by.get(f"{method}-aware-{keep}")
        if u and a:
            c = a.get("config") or {}
            rule = (f"{c.get('aware_loss', 'relative')}, per {c.get('aware_group', 'matrix')}, "
                    f"spread {c.get('rank_spread', 1.5):g}, floor {c.get('floor_ratio', 0.05):g}")
            pairs.append({"method": method, "keep": keep, "ppl_uniform": u["ppl"], "ppl_aware": a["ppl"],
                          "reduction": 1 - a["ppl"] / u["ppl"], "keep_reached_uniform": u.get("keep_ratio_reached"),
                          "keep_reached_aware": a.get("keep_ratio_reached"), "aware_rule": rule,
                          "layers_dense_aware": a.get("layers_dense"), "stored_bytes_uniform": u["stored_bytes"],
                          "stored_bytes_aware": a["stored_bytes"]})
    return pairs


def p2_markdown(p2: dict) -> str:
    s, env, history = p2.get("sizes") or {}, p2.get("env") or {}, p2.get("p2_history", [])
    spec = [("method", "{method}"), ("keep", "{keep}"), ("uniform ppl", "{ppl_uniform:.2f}"),
            ("aware ppl", "{ppl_aware:.2f}"), ("change", lambda p: f"{-p['reduction']:+.1%}"),
            ("target ≥ 10 % lower", lambda p: ("met" if p["reduction"] >= 0.10 else "MISSED")  # the target
             if p["method"] == "saes-svd" and p["keep"] in (0.6, 0.4) else "(no target)"),
            ("keep reached (u / a)", "{keep_reached_uniform:.4f} / {keep_reached_aware:.4f}"),
            ("dense layers (aware)", "{layers_dense_aware}"), ("aware rule", lambda p: p.get("aware_rule", ""))]
    return markdown(
        f"# P2: activation-aware vs uniform ranks ({p2.get('model')}, {p2.get('data')})",
        f"Run {env.get('date', '?')}, git {env.get('git_sha', '?')} (rows of reports/frontier{p2.get('suffix', '')}"
        f".json). Same calibration for both ({s.get('calib_windows')}×{s.get('calib_seq')} tokens of the first "
        f"half of {p2.get('data')}), perplexity on {s.get('eval_windows')}×{s.get('eval_seq')} tokens of the "
        "second half. Aware ranks (`allocation: aware`, the rule of each row in the last column) get at most "
        "the parameters the uniform plan keeps.", columns(spec, p2["pairs"]),
        *(["Other aware rules measured on the same split (replaced in the table above):",
           [f"- {h}" for h in history]] if history else []))


def main(argv=None) -> None:
    global OUT
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    sizes_and_heal_arguments(p, heal_steps=40)
    for knob, kind in AWARE_KNOBS.items():
        p.add_argument(f"--{knob.replace('_', '-')}", type=kind, default=None, help=f"aware rows: `{knob}`")
    p.add_argument("--stories", action="store_true", help="stories260K on embedded TinyStories (CI-size; *_stories)")
    args = p.parse_args(argv)
    OUT = Path(args.out)
    report = Report(OUT, "frontier_stories" if args.stories else "frontier", render, png=plot)
    if not args.render:
        if not args.stories:
            need_file(args.smollm2, "--smollm2 PATH")
        import torch

        torch.set_num_threads(args.threads)
        run(args, report)
    if not args.stories and Path(args.smollm2).is_file():  # the GGUF source point: its file's bytes
        report.state.update(gguf=Path(args.smollm2).name, gguf_bytes=Path(args.smollm2).stat().st_size)
        write_text(OUT / "frontier.json", json.dumps(report.state, indent=1, default=str) + "\n")
    render_all(report.state)


if __name__ == "__main__":
    main()

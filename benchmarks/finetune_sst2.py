"""F2, F3, F5 of BENCHMARKS.md: SST-2 few-shot accuracy per fine-tuning method, trainable
parameter counts, and KappaTune's forgetting against LoRA at matched training loss.

F2  all-MiniLM-L6-v2 + a linear head on mean-pooled states; `--train` SST-2 rows (half per label),
    accuracy on `--eval` held-out rows of the same file (the trainer's seeded split). Baselines:
    zero-shot (cosine to two label sentences) and a linear probe. Every method starts from the
    probe's head (LP-then-FT): backprop, LoRA r8, NOLA, DSEE (+ 50 % pruning and re-tuning),
    KappaTune-LoRA, MeZO.
F3  parameters each method trains, on MiniLM and SmolLM2-135M (installed, nothing trained).
F5  stories260K tuned as a language model on SST-2 sentences; forgetting = increase of its
    perplexity on held-out TinyStories. LoRA on every linear vs KappaTune-LoRA, compared where both
    reach the same smoothed train loss.

Example:  nice -n 10 python benchmarks/finetune_sst2.py --threads 1   (F2 about 65 min, F3 2, F5 6)
"""

import copy
import json
from pathlib import Path

import torch

from harness import (Report, apply_method, arguments, columns, command_line, environment, eval_windows, load, log,
                     markdown, need_file, numbers, rerender, table)
from quality import embed, minilm_dir

# MiniLM's pooler is unused by mean pooling: adapters on it would count parameters that never train.
IGNORE = ["pooler.dense"]
LABEL_SENTENCES = {"0": "a terrible, boring movie.", "1": "a great, wonderful movie."}
# Method -> (stage, fields). Rates were picked once for a 2-epoch budget, not tuned on eval rows.
F2_METHODS = {"full": ("backprop", {"lr": 5e-5}), "lora": ("lora", {"r": 8, "alpha": 16, "lr": 1e-3, "ignore": IGNORE}),
              "nola": ("nola", {"r": 8, "alpha": 8, "num_basis_a": 512, "num_basis_b": 512, "cache_bases": True,
                                "lr": 5e-3, "ignore": IGNORE}),
              "dsee": ("dsee", {"r": 16, "alpha": 32, "num_sparse": 64, "prune": "unstructured", "prune_ratio": 0.5,
                                "lr": 1e-3}),
              "kappatune": ("kappatune", {"mode": "lora", "lr": 1e-3, "ignore": IGNORE}),
              "mezo": ("mezo", {"lr": 1e-5, "mezo_eps": 1e-3})}
DSEE_KEYS = ("accuracy_after", "retune_accuracy_before", "retune_accuracy_after",
             "flops_per_token_dense", "flops_per_token_dsee", "flops_saved_fraction")


def parse_args(argv=None):
    p = arguments(__doc__, smollm2=True, data=True)
    p.add_argument("--part", choices=("f2", "f3", "f5", "all"), default="all")
    p.add_argument("--minilm", help="all-MiniLM-L6-v2 folder (default: the pip package's)")
    p.add_argument("--methods", default=",".join(F2_METHODS), help="F2 methods, comma-separated")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="an F2 method's lr (repeatable)")
    numbers(p, (("train", 512), ("eval", 500), ("steps", 64), ("mezo-steps", 300), ("seq-len", 48),
                ("f5-steps", 300), ("seed", 0)))
    return p.parse_args(argv)


def sst2_config(args, **fields) -> dict:
    return {"data": str(Path(args.data_dir) / "sst2" / "train.tsv"), "task": "classification",
            "k_shot": args.train // 2, "num_eval": args.eval, "seq_len": args.seq_len,
            "batch_size": 16, "steps": args.steps, "seed": args.seed, **fields}


@torch.no_grad()
def pooled(model, inputs: dict, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states (N, D): the features the classification head reads."""
    chunks = []
    for ids, mask in zip(inputs["input_ids"].split(batch_size), inputs["attention_mask"].split(batch_size)):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        chunks.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1))
    return torch.cat(chunks)


def zero_shot_and_probe(args, loaded, data) -> tuple[dict, torch.nn.Linear]:
    """Zero-shot accuracy (cosine to label sentences) and a linear probe on frozen features."""
    model, tokenizer, labels = loaded.model, loaded.tokenizer, data.train["labels"]
    train_x, eval_x = pooled(model, data.train), pooled(model, data.eval)
    anchor_x = embed(model, tokenizer, [LABEL_SENTENCES[label] for label in data.labels])
    guess = (torch.nn.functional.normalize(eval_x, dim=-1) @ anchor_x.T).argmax(-1)
    torch.manual_seed(args.seed)
    head = torch.nn.Linear(train_x.shape[1], len(data.labels))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):  # full-batch logistic regression on 512 rows
        loss = torch.nn.functional.cross_entropy(head(train_x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hits = {"zero_shot": guess, "linear_probe": head(eval_x).argmax(-1)}
    return {k: float((g == data.eval["labels"]).float().mean()) for k, g in hits.items()}, head


def run_f2_method(args, name: str, head: torch.nn.Linear) -> dict:
    """A fresh MiniLM with the probe's head, tuned by one registered stage."""
    from compressor.training.data import HEAD_NAME

    stage, fields = F2_METHODS[name]
    lrs = dict(item.split("=", 1) for item in args.lr)
    loaded, ctx = load(args.minilm, seed=args.seed)
    loaded.model.add_module(HEAD_NAME, copy.deepcopy(head))  # the trainer reuses an existing head
    steps = args.mezo_steps if name == "mezo" else args.steps
    fields = {**fields, **({"lr": float(lrs[name])} if name in lrs else {})}
    result, config, seconds = apply_method(loaded.model, stage, sst2_config(args, **fields, steps=steps), ctx)
    m = result.metrics
    row = {"method": name, "stage": stage, "steps": steps, "lr": config["lr"], "seconds": seconds,
           "accuracy_before": m.get("accuracy_before"), "accuracy": m.get("accuracy_final", m.get("accuracy_after")),
           "trainable_params": m["trainable_params"], "method_params": m.get("method_params"),
           "head_params": sum(p.numel() for p in head.parameters()), "peak_memory_mb": m.get("peak_memory_mb"),
           **({k: m[k] for k in DSEE_KEYS} if name == "dsee" else {})}
    log(f"{name}: accuracy {row['accuracy_before']:.3f} -> {row['accuracy']:.3f}, {row['trainable_params']:,} params")
    return row


def run_f2(args) -> dict:
    """Baselines, then each method."""
    from compressor.training import TrainConfig
    from compressor.training.data import build_task_data

    args.minilm = args.minilm or minilm_dir()
    loaded, ctx = load(args.minilm, seed=args.seed)
    data = build_task_data(TrainConfig.from_dict(sst2_config(args)), ctx)
    baselines, head = zero_shot_and_probe(args, loaded, data)
    print(f"F2 baselines: {baselines}", flush=True)
    rows = [run_f2_method(args, name, head) for name in args.methods.split(",") if name]
    return {"model": args.minilm, "train_rows": data.num_train, "eval_rows": data.num_eval,
            "seq_len": args.seq_len, "batch_size": 16, "baselines": baselines, "methods": rows}


def adapter_counts(model, ctx) -> dict:
    """What each adapter would train on `model`: installed on a copy, never trained."""
    from compressor.adapters import _peft_lora as lora
    from compressor.adapters import kappatune, nola
    from compressor.adapters.dsee import DseeConfig, dsee_params, install_dsee
    from compressor.targeting import select_linears

    def lora_on(m, names, rank: int) -> dict:
        lora.inject_lora(m, names, rank=rank, alpha=2 * rank, dropout=0.0)
        return lora.lora_params(m)

    def nola_on(m, k: int) -> dict:
        nola.install_nola(m, nola.NolaConfig(r=8, num_basis_a=k, num_basis_b=k, ignore=IGNORE), 0)
        return nola.coefficient_params(m)

    kappa = kappatune.KappaTuneConfig(ignore=IGNORE)
    installs = {"lora_r8_all_linears": lambda m: lora_on(m, list(select_linears(m, (), IGNORE)), 8),
                "nola_k512_all_linears": lambda m: nola_on(m, 512), "nola_k256_all_linears": lambda m: nola_on(m, 256),
                # where Ω lies does not change the count: a random support skips GreBsmo
                "dsee_r16_n64_qv": lambda m: dsee_params(install_dsee(m, DseeConfig(sparse_method="random"), ctx, 0)),
                "kappatune_lora_r16_top20pct": lambda m: lora_on(
                    m, kappatune.select_modules(kappatune.condition_numbers(m, kappa, ctx)[0], kappa), 16)}
    counts = {"full": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    for key, install in installs.items():
        counts[key] = sum(p.numel() for p in install(copy.deepcopy(model)).values())
    for k in (512, 256):
        counts[f"nola_k{k}_over_lora_r8"] = counts[f"nola_k{k}_all_linears"] / counts["lora_r8_all_linears"]
    return counts


def run_f3(args) -> dict:
    """Counts on both models; F2's measured counts (and DSEE's FLOPs) quoted from finetune_sst2.json."""
    need_file(args.smollm2, "--smollm2 PATH")
    out = {}
    for label, path in (("all-MiniLM-L6-v2", args.minilm or minilm_dir()), ("SmolLM2-135M", args.smollm2)):
        loaded, ctx = load(path)
        out[label] = adapter_counts(loaded.model, ctx)
        print(f"F3 {label}: {out[label]}", flush=True)
    f2 = Path(args.out) / "finetune_sst2.json"
    methods = json.loads(f2.read_text())["methods"] if f2.is_file() else []
    dsee = next((r for r in methods if r["method"] == "dsee"), None)
    if methods:
        out["f2_trainable_incl_head"] = {r["method"]: r["trainable_params"] for r in methods}
    if dsee:
        out["dsee_flops_minilm"] = {k: dsee[k] for k in DSEE_KEYS[3:]}
    return out


def smoothed(losses: list[float], window: int = 20) -> list[float]:
    """Trailing mean over `window` steps (fewer at the start)."""
    return [sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))]


def f5_run(args, selection: str) -> dict:
    """Tune a LoRA on stories260K with SST-2 text; log task and general-text perplexity."""
    from compressor import evaluation
    from compressor.adapters import _peft_lora as lora
    from compressor.adapters import kappatune
    from compressor.targeting import select_linears
    from compressor.training import TrainConfig
    from compressor.training.data import build_task_data
    from compressor.training.losses import evaluate

    loaded, ctx = load(None, seed=args.seed)
    config = TrainConfig(data=str(Path(args.data_dir) / "sst2" / "train.tsv"), task="lm", seq_len=64, batch_size=8,
                         steps=args.f5_steps, lr=2e-3, eval_every=10, num_eval=16, seed=args.seed)
    general = eval_windows(ctx, str(Path(args.data_dir) / "tinystories" / "tinystories_val_a.txt"), 128, 32)
    data = build_task_data(config, ctx)

    def eval_fn(model):  # general text first: the order the committed run evaluated in
        general_ppl = evaluation.perplexity(model, general, batch_size=8)["perplexity"]
        return {"task_perplexity": evaluate(model, data, 8, "cpu")["perplexity"], "general_perplexity": general_ppl}

    names = list(select_linears(loaded.model))
    if selection == "kappatune":
        kappas, _ = kappatune.condition_numbers(loaded.model, kappatune.KappaTuneConfig(), ctx)
        names = kappatune.select_modules(kappas, kappatune.KappaTuneConfig())
    result = lora.train_lora(loaded.model, names, config, ctx, rank=16, alpha=32, dropout=0.05,
                             merge=False, method=f"f5-{selection}", eval_fn=eval_fn, data=data)
    curves = result.curves  # evaluations as staircases over steps 0..N: index s holds the one at step s
    steps = [0, *range(10, len(curves["loss"]), 10), len(curves["loss"])]  # fit's eval points
    evals = [{"step": s, "task_perplexity": curves["eval_task_perplexity"][s],
              "general_perplexity": curves["eval_general_perplexity"][s]} for s in steps]
    return {"selection": selection, "adapted": len(names), "losses": curves["loss"], "evals": evals,
            "trainable_params": result.metrics["trainable_params"]}


def at_loss(run: dict, target: float) -> dict:
    """The first evaluation at which the run's smoothed training loss is <= target."""
    curve = smoothed(run["losses"])
    for point in run["evals"][1:]:
        if curve[point["step"] - 1] <= target:
            return {**point, "smoothed_train_loss": curve[point["step"] - 1]}
    return {**run["evals"][-1], "smoothed_train_loss": curve[-1], "note": "target not reached"}


def run_f5(args) -> dict:
    runs = {sel: f5_run(args, sel) for sel in ("all", "kappatune")}
    target = max(smoothed(r["losses"])[-1] for r in runs.values())  # a loss both runs reach
    summary = {}
    for sel, run in runs.items():
        before, matched = run["evals"][0]["general_perplexity"], at_loss(run, target)
        summary[sel] = {"adapted_modules": run["adapted"], "trainable_params": run["trainable_params"],
                        "general_perplexity_before": before, "matched": matched,
                        "forgetting_at_matched_loss": matched["general_perplexity"] / before - 1,
                        "forgetting_at_end": run["evals"][-1]["general_perplexity"] / before - 1}
        print(f"F5 {sel}: {summary[sel]}", flush=True)
    return {"model": "stories260K", "task": "LM on SST-2 sentences", "steps": args.f5_steps,
            "general_text": "TinyStories validation (held-out windows)",
            "matched_smoothed_train_loss": target, "summary": summary, "runs": runs}


def header(title: str, state: dict) -> list[str]:
    env, v = state["env"], state["env"]["versions"]
    command = "`; `".join(state.get("commands") or [state["command"]])
    return [f"# {title}", f"Measured {env['date']} on {env['device_name']} (host {env['host']}), git {env['git_sha']}, "
            f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}.", f"Command: `{command}`"]


# finetune_sst2.json's run 2 was merged into it by hand (its env is `env_run2`): what the report says of it
RUN2_NOTE = ("Run 2 re-ran LoRA and NOLA at lower learning rates chosen after seeing run 1's held-out accuracy, so "
             "its numbers are tuned on the evaluation rows (a sensitivity check, not a clean result). MeZO ran 300 "
             "steps (2 forward passes each) with the pure-torch noise generator on CPU, hence its time.")


def render_f2(f2: dict) -> str:
    base = f2["baselines"]
    rows = [["zero-shot (cosine to label sentences)", 0, "-", f"{base['zero_shot']:.3f}", "0", "-", "-"],
            ["linear probe", "500 (full batch)", "1e-2", f"{base['linear_probe']:.3f}", "770", "-", "-"]]
    rows += [[f"{r['method']} ({r['stage']})" + (f", run {r['run']}" if r.get("run") else ""), r["steps"],
              f"{r['lr']:g}", f"{r['accuracy']:.3f}", f"{r['trainable_params']:,}",
              f"{r['method_params']:,}" if r.get("method_params") else "-", f"{r['seconds']:.0f}"]
             for r in f2["methods"]]
    return markdown(*header("F2: SST-2 few-shot accuracy", f2),
                    f"all-MiniLM-L6-v2 + linear head, {f2['train_rows']} SST-2 training rows, {f2['eval_rows']} "
                    f"held-out rows (seq {f2['seq_len']}, batch 16). Every method starts from the linear probe's "
                    "head; `trainable` includes its 770 parameters.",
                    table(["method", "steps", "lr", "accuracy", "trainable", "method params", "seconds"], rows),
                    *(dsee_line(r) for r in f2["methods"] if r["method"] == "dsee"), "env_run2" in f2 and RUN2_NOTE)


def dsee_line(row: dict) -> str:
    run = f" (run {row['run']})" if row.get("run") else ""
    return (f"DSEE{run}: accuracy {row['accuracy_after']:.3f} after tuning, "
            f"{row['retune_accuracy_before']:.3f} after pruning, {row['retune_accuracy_after']:.3f} after "
            f"re-tuning; FLOPs per token {row['flops_per_token_dense']:,} dense -> {row['flops_per_token_dsee']:,} "
            f"({row['flops_saved_fraction']:.1%} saved, counting non-zero weights + adapters).")


def render_f3(f3: dict) -> str:
    models = ["all-MiniLM-L6-v2", "SmolLM2-135M"]
    counts = [[k, *(f"{f3[m][k]:,}" if isinstance(f3[m][k], int) else f"{f3[m][k]:.4f}" for m in models)]
              for k in f3[models[0]]]  # parameter counts, then the NOLA / LoRA ratios
    rest = {k: v for k, v in f3.items() if k not in (*models, "env", "command")}
    return markdown(*header("F3: trainable parameters", f3), table(["count", *models], counts),
                    f"```json\n{json.dumps(rest, indent=1)}\n```")


def render_f5(f5: dict) -> str:
    spec = [("LoRA on", "{on}"), ("modules", "{adapted_modules}"), ("trainable", "{trainable_params:,}"),
            ("general ppl before", "{general_perplexity_before:.3f}"), ("step at matched loss", "{matched[step]}"),
            ("task ppl there", "{matched[task_perplexity]:.2f}"),
            ("general ppl there", "{matched[general_perplexity]:.3f}"),
            ("forgetting there", "{forgetting_at_matched_loss:+.1%}"),
            ("forgetting at end", "{forgetting_at_end:+.1%}")]
    return markdown(*header("F5: KappaTune forgetting vs LoRA at matched training loss", f5),
                    f"{f5['model']}, LoRA r16 α32 for {f5['steps']} steps on {f5['task']}; general text: "
                    f"{f5['general_text']}. Matched smoothed training loss: {f5['matched_smoothed_train_loss']:.4f}.",
                    columns(spec, [{"on": on, **s} for on, s in f5["summary"].items()]))


# part -> (report, measure, render): F3 quotes the finetune_sst2.json an F2 part of the same run wrote first
PARTS = {"f2": ("finetune_sst2", run_f2, render_f2), "f3": ("finetune_params", run_f3, render_f3),
         "f5": ("kappatune_forgetting", run_f5, render_f5)}


def main(argv=None) -> None:
    args = parse_args(argv)
    for part in ["f2", "f3", "f5"] if args.part == "all" else [args.part]:
        name, run, render = PARTS[part]
        if args.render:
            print(rerender(Path(args.out), name, render))
            continue
        torch.set_num_threads(args.threads)
        report = Report(args.out, name, render)
        report.state = {"env": environment(args.seed), "command": command_line(), **run(args)}
        report.write()
        print(f"wrote {Path(args.out) / name}.json and .md", flush=True)


if __name__ == "__main__":
    main()

"""F4: Sorted fine-tuning vs plain fine-tuning + truncation, perplexity at every exit (BENCHMARKS §F).

stories260K (embedded, 5 layers) is fine-tuned twice with the same budget (steps, lr, batch,
data order, seed) on the first half of a TinyStories text:
  plain   full fine-tuning (the `backprop` stage), then read at each depth n
  sorted  Sorted FT (the `sorted` stage): loss summed over exits [2, 3, 4, 5] in one forward pass
Every sub-model n = first n blocks + the shared final norm + LM head is evaluated on held-out
windows of the second half of the text (never trained on), as is the untuned model.
Target: every early exit of the sorted model has lower perplexity than the same truncation of the
plainly fine-tuned model.

Data: --data-dir holding tinystories/tinystories_val_a.txt (COMPRESSOR_DATA), or --text FILE
(default: the embedded TinyStories excerpt when neither exists).

Example:  nice -n 10 python benchmarks/sorted_exits.py --threads 2        (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from compressor.context import Context
from compressor.evaluation import perplexity
from compressor.models import load_model
from compressor.report.env import collect_env
from compressor.training.sorted_ft import SortedConfig, default_exits
from compressor.training.sorted_ft import apply as sorted_apply
from compressor.training.backprop import BackpropConfig
from compressor.training.backprop import apply as backprop_apply

DEFAULT_DATA = "/work/shared/data"
REPORTS = Path(__file__).resolve().parent.parent / "reports"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("COMPRESSOR_DATA", DEFAULT_DATA))
    p.add_argument("--text", default=None, help="tuning/eval text file (overrides --data-dir)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPORTS))
    return p.parse_args(argv)


def text_source(args) -> str:
    if args.text:
        return args.text
    path = Path(args.data_dir) / "tinystories" / "tinystories_val_a.txt"
    return str(path) if path.is_file() else "default"


def exit_perplexities(model, windows, exits: list[int]) -> dict[int, float]:
    return {n: perplexity(model, windows, batch_size=16, exit_layer=n)["perplexity"] for n in exits}


def tune(kind: str, args, source: str) -> tuple[torch.nn.Module, float]:
    loaded = load_model(None)
    ctx = Context(tokenizer=loaded.tokenizer, seed=args.seed, quiet=True)
    common = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch, "seq_len": args.seq,
              "data": source, "num_eval": 8, "seed": args.seed, "schedule": args.schedule,
              "warmup_steps": args.warmup}  # fmt: skip
    started = time.perf_counter()
    if kind == "plain":
        backprop_apply(loaded.model, BackpropConfig(**common), ctx)
    else:
        sorted_apply(loaded.model, SortedConfig(**common), ctx)
    return loaded.model, time.perf_counter() - started


def render(result: dict) -> str:
    lines = [
        "# F4 — Sorted fine-tuning vs plain fine-tuning + truncation (stories260K)",
        "",
        (
            f"Tuning text: `{result['data']}` (train = first half, evaluation = {result['eval_tokens']:,} "
            f"held-out tokens of the second half). Both runs: {result['steps']} AdamW steps, lr {result['lr']} "
            f"({result['schedule']}, {result['warmup']} warm-up steps), "
            f"batch {result['batch']} x {result['seq']}, same data order and seed. Sorted exits {result['exits']}."
        ),
        "",
        "| exit (layers) | untuned | plain FT, truncated | sorted FT | sorted / plain |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in result["exits"]:
        b, p, s = (result[k][str(n)] for k in ("untuned", "plain", "sorted"))
        lines.append(f"| {n} | {b:.3f} | {p:.3f} | {s:.3f} | {s / p:.3f} |")
    verdict = "yes" if result["every_early_exit_better"] else "NO"
    lines += [
        "",
        (
            f"Every early exit better than the truncated plain model: **{verdict}**. Training time: plain "
            f"{result['seconds']['plain']:.1f} s, sorted {result['seconds']['sorted']:.1f} s "
            f"(ratio {result['seconds']['sorted'] / result['seconds']['plain']:.2f}, same run)."
        ),
        "",
        f"Command: `{result['command']}`  ",
        (
            f"git {result['env']['git_sha']}, torch {result['env']['versions']['torch']}, "
            f"{result['env']['device_name']}, {result['env']['date']}"
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    source = text_source(args)
    base = load_model(None)
    exits = default_exits(base.model.config.num_hidden_layers)
    ctx = Context(tokenizer=base.tokenizer, seed=args.seed, quiet=True)
    windows = ctx.windows(source, split="eval", seq_len=args.seq, num_windows=args.eval_windows)
    result = {"benchmark": "F4", "data": Path(source).name, "exits": exits, "steps": args.steps, "lr": args.lr,
              "schedule": args.schedule, "warmup": args.warmup,
              "batch": args.batch, "seq": args.seq, "eval_tokens": int(windows.numel()),
              "env": collect_env(torch.device("cpu"), args.seed), "seconds": {},
              "command": "python benchmarks/sorted_exits.py " + " ".join(sys.argv[1:])}  # fmt: skip
    result["untuned"] = {
        str(n): v for n, v in exit_perplexities(base.model, windows, exits).items()
    }
    for kind in ("plain", "sorted"):
        model, seconds = tune(kind, args, source)
        result[kind] = {str(n): v for n, v in exit_perplexities(model, windows, exits).items()}
        result["seconds"][kind] = seconds
        print(f"{kind}: {result[kind]} ({seconds:.1f} s)", flush=True)
    early = [str(n) for n in exits[:-1]]
    result["every_early_exit_better"] = all(result["sorted"][n] < result["plain"][n] for n in early)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_sorted.json").write_text(json.dumps(result, indent=2))
    (out / "finetune_sorted.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()

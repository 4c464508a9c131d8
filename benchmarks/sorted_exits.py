"""F4: Sorted fine-tuning vs plain fine-tuning + truncation, perplexity at every exit (BENCHMARKS §F).

stories260K (embedded, 5 layers) is fine-tuned twice with the same budget (steps, lr, batch, data
order, seed) on the first half of a TinyStories text: `plain` = full fine-tuning (`backprop`), read
at each depth n; `sorted` = Sorted FT (loss summed over exits [2, 3, 4, 5] in one pass). Every
sub-model n (first n blocks + final norm + LM head) is evaluated on held-out windows of the second
half, as is the untuned model. Target: every early exit of the sorted model beats the same
truncation of the plainly tuned one.
Text: --text FILE, else <data-dir>/tinystories/tinystories_val_a.txt, else the embedded excerpt.
Example:  nice -n 10 python benchmarks/sorted_exits.py --threads 2        (a few minutes)
"""

from __future__ import annotations

import time
from pathlib import Path

from harness import Report, arguments, command_line, environment, eval_windows, load, numbers, rerender


def tune(kind: str, args, source: str):
    """stories260K tuned by `backprop` (plain) or `sorted`; (model, seconds)."""
    from compressor.training.backprop import BackpropConfig
    from compressor.training.backprop import apply as backprop_apply
    from compressor.training.sorted_ft import SortedConfig
    from compressor.training.sorted_ft import apply as sorted_apply

    loaded, ctx = load(None, seed=args.seed)
    common = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch, "seq_len": args.seq, "data": source,
              "num_eval": 8, "seed": args.seed, "schedule": args.schedule, "warmup_steps": args.warmup}
    started = time.perf_counter()
    if kind == "plain":
        backprop_apply(loaded.model, BackpropConfig(**common), ctx)
    else:
        sorted_apply(loaded.model, SortedConfig(**common), ctx)
    return loaded.model, time.perf_counter() - started


def render(result: dict) -> str:
    rows = [f"| {n} | {b:.3f} | {p:.3f} | {s:.3f} | {s / p:.3f} |" for n in result["exits"]
            for b, p, s in [[result[k][str(n)] for k in ("untuned", "plain", "sorted")]]]
    seconds, env = result["seconds"], result["env"]
    return "\n".join([
        "# F4 — Sorted fine-tuning vs plain fine-tuning + truncation (stories260K)", "",
        f"Tuning text: `{result['data']}` (train = first half, evaluation = {result['eval_tokens']:,} "
        f"held-out tokens of the second half). Both runs: {result['steps']} AdamW steps, lr {result['lr']} "
        f"({result['schedule']}, {result['warmup']} warm-up steps), batch {result['batch']} x {result['seq']}, "
        f"same data order and seed. Sorted exits {result['exits']}.", "",
        "| exit (layers) | untuned | plain FT, truncated | sorted FT | sorted / plain |", "|---:|---:|---:|---:|---:|",
        *rows, "",
        f"Every early exit better than the truncated plain model: "
        f"**{'yes' if result['every_early_exit_better'] else 'NO'}**. Training time: plain {seconds['plain']:.1f} s, "
        f"sorted {seconds['sorted']:.1f} s (ratio {seconds['sorted'] / seconds['plain']:.2f}, same run).", "",
        f"Command: `{result['command']}`  ",
        f"git {env['git_sha']}, torch {env['versions']['torch']}, {env['device_name']}, {env['date']}"]) + "\n"


def main(argv=None) -> None:
    p = arguments(__doc__, data=True, threads=2)
    p.add_argument("--text", default=None, help="tuning/eval text file (overrides --data-dir)")
    numbers(p, (("steps", 300), ("warmup", 10), ("batch", 16), ("seq", 128), ("eval-windows", 64), ("seed", 0)))
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    args = p.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "finetune_sorted", render))
    import torch

    from compressor.evaluation import perplexity
    from compressor.training.sorted_ft import default_exits

    torch.set_num_threads(args.threads)
    text = Path(args.data_dir) / "tinystories" / "tinystories_val_a.txt"
    source = args.text or (str(text) if text.is_file() else "default")
    base, ctx = load(None, seed=args.seed)
    exits = default_exits(base.model.config.num_hidden_layers)
    windows = eval_windows(ctx, source, args.seq, args.eval_windows)

    def exit_perplexities(model) -> dict[str, float]:
        return {str(n): perplexity(model, windows, batch_size=16, exit_layer=n)["perplexity"] for n in exits}

    report = Report(args.out, "finetune_sorted", render)
    report.state = {"benchmark": "F4", "data": Path(source).name, "exits": exits, "steps": args.steps, "lr": args.lr,
                    "schedule": args.schedule, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
                    "eval_tokens": int(windows.numel()), "env": environment(args.seed), "seconds": {},
                    "command": command_line(), "untuned": exit_perplexities(base.model)}
    for kind in ("plain", "sorted"):
        model, report.state["seconds"][kind] = tune(kind, args, source)
        report.state[kind] = exit_perplexities(model)
        print(f"{kind}: {report.state[kind]} ({report.state['seconds'][kind]:.1f} s)", flush=True)
    report.state["every_early_exit_better"] = all(report.state["sorted"][str(n)] < report.state["plain"][str(n)]
                                                  for n in exits[:-1])
    report.write()
    print(render(report.state))


if __name__ == "__main__":
    main()

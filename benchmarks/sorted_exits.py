"""F4: Sorted fine-tuning vs plain fine-tuning + truncation, perplexity at every exit (BENCHMARKS §F).

stories260K (embedded, 5 layers) is fine-tuned twice with one budget (steps, lr, batch, data order, seed) on the first
half of a TinyStories text: `plain` = full fine-tuning (`backprop`), `sorted` = Sorted FT (loss summed over exits
[2, 3, 4, 5] in one pass). Every sub-model n (first n blocks + final norm + LM head) of both and of the untuned model
is evaluated on held-out windows of the second half. Target: every early exit of the sorted model beats the same
truncation of the plainly tuned one.
"""

from pathlib import Path

import torch

from harness import Report, apply_method, arguments, command_line, environment, eval_windows, load, numbers, rerender

# the budget both runs share: the report's name of each flag -> its training-config field
BUDGET = dict(steps="steps", lr="lr", schedule="schedule", warmup="warmup_steps", batch="batch_size", seq="seq_len")


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
    numbers(p, (("steps", 300), ("warmup", 10), ("batch", 16), ("seq", 128), ("eval-windows", 64), ("seed", 0),
                ("lr", 3e-4)))
    p.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    args = p.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "finetune_sorted", render))
    from compressor.evaluation import perplexity
    from compressor.training.sorted_ft import default_exits

    torch.set_num_threads(args.threads)
    text = Path(args.data_dir, "tinystories", "tinystories_val_a.txt")
    source = str(text) if text.is_file() else "default"  # TinyStories under --data-dir, else the embedded text
    base, ctx = load(None, seed=args.seed)
    exits = default_exits(base.model.config.num_hidden_layers)
    windows = eval_windows(ctx, source, args.seq, args.eval_windows)
    report = Report(args.out, "finetune_sorted", render)
    report.state = state = {
        "benchmark": "F4", "data": Path(source).name, "exits": exits, **{k: getattr(args, k) for k in BUDGET},
        "eval_tokens": int(windows.numel()), "env": environment(args.seed), "seconds": {}, "command": command_line()}
    fields = {**{f: getattr(args, k) for k, f in BUDGET.items()}, "data": source, "num_eval": 8, "seed": args.seed}
    for kind, method in (("untuned", None), ("plain", "backprop"), ("sorted", "sorted")):
        loaded, ctx = load(None, seed=args.seed)  # the same start, data order and seed for each
        if method is not None:
            _, _, state["seconds"][kind] = apply_method(loaded.model, method, fields, ctx)
        state[kind] = {str(n): perplexity(loaded.model, windows, batch_size=16, exit_layer=n)["perplexity"]
                       for n in exits}
    state["every_early_exit_better"] = all(state["sorted"][str(n)] < state["plain"][str(n)] for n in exits[:-1])
    report.write()
    print(render(state))


if __name__ == "__main__":
    main()

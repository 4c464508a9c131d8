"""F1: peak memory of one MeZO step vs inference vs backprop + AdamW (BENCHMARKS.md §F).

Each mode runs in a fresh subprocess (`worker`) on `--batch` x `--seq` tokens:

  forward    model(input_ids).logits under no_grad (full (B, T, vocab) logits)
  inference  the loss MeZO evaluates, once, under no_grad (`lm_loss`: logits in chunks)
  mezo       one full MeZO step on every weight (perturb, 2 losses, restore, update)
  backprop   two AdamW steps on every weight (the optimizer state exists from the first step)
"""

import json
import sys
import time
from pathlib import Path

from harness import (SMOLLM2, Report, arguments, command_line, environment, need_file, numbers, rerender,
                     run_worker)

from compressor.memory import proc_status_mb

MODES = ("forward", "inference", "mezo", "backprop")
# ratio name -> (numerator mode, denominator mode, the readings it is taken of)
RATIOS = {"mezo_over_inference": ("mezo", "inference", ("peak", "growth")),
          "backprop_over_mezo": ("backprop", "mezo", ("peak", "growth")),
          "mezo_over_forward": ("mezo", "forward", ("peak",))}


def worker(args) -> dict:
    """In the subprocess: load, read the resident set (the baseline), reset the high-water mark
    (/proc/self/clear_refs <- 5), do the mode's work (its last loss is kept), read VmHWM."""
    import torch

    from compressor.models import load_model
    from compressor.training.losses import lm_loss
    from compressor.training.mezo_optimizer import mezo_update_, spsa_gradient, step_seed

    torch.set_num_threads(args.threads)
    model = load_model(None if args.model == "default" else args.model).model.eval()
    params = list(model.parameters())
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.seq))}
    baseline = proc_status_mb("VmRSS", required=True)
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    if args.worker == "backprop":
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        model.train()
        for _ in range(2):
            loss = lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = loss.item()
    with torch.no_grad():  # the other modes
        if args.worker == "forward":
            loss = float(model(input_ids=batch["input_ids"]).logits[0, 0, 0])
        elif args.worker == "inference":
            loss = lm_loss(model, batch).item()
        elif args.worker == "mezo":
            grad, loss, _ = spsa_gradient(params, lambda: lm_loss(model, batch).item(), step_seed(0, 0), 1e-3)
            mezo_update_(params, step_seed(0, 0), grad, 1e-6, 0.0, [False] * len(params))
    peak = proc_status_mb("VmHWM", required=True)
    return {"mode": args.worker, "baseline_mb": baseline, "peak_mb": peak, "growth_mb": peak - baseline,
            "seconds": time.perf_counter() - started, "loss": loss, "params": sum(p.numel() for p in params)}


def render(result: dict) -> str:
    rows, ratios, env = result["modes"], result["ratios"], result["env"]
    return "\n".join(["# F1 — fine-tuning peak memory", "",
        (f"Model `{result['model']}` ({rows['mezo']['params']:,} parameters), batch {result['batch']} x "
         f"{result['seq']} tokens, fp32 on CPU, {result['threads']} threads; each mode in a fresh process. "
         "Peak = resident-set high-water mark during the work; growth = peak minus the resident set "
         "right after loading the model."), "",
        "| mode | peak RSS MB | growth MB | seconds |", "|---|---:|---:|---:|",
        *("| {mode} | {peak_mb:.0f} | {growth_mb:.0f} | {seconds:.1f} |".format_map(rows[m]) for m in MODES), "",
        (f"* MeZO / inference peak: **{ratios['mezo_over_inference_peak']:.3f}x** (target <= 1.2x); "
         f"growth ratio {ratios['mezo_over_inference_growth']:.3f}x"),
        (f"* backprop+AdamW / MeZO peak: **{ratios['backprop_over_mezo_peak']:.2f}x** (target >= 3x); "
         f"growth ratio {ratios['backprop_over_mezo_growth']:.2f}x"),
        (f"* MeZO / plain forward with full logits: {ratios['mezo_over_forward_peak']:.3f}x "
         "(the loss never materialises the (B, T, vocab) logits)"), "",
        f"Command: `{result['command']}`  ",
        f"git {env['git_sha']}, torch {env['versions']['torch']}, {env['device_name']}, {env['date']}"]) + "\n"


def main(argv=None) -> None:
    p = arguments(__doc__, threads=2)
    p.add_argument("--model", default=SMOLLM2, help="a GGUF, or `default`: the embedded stories260K (a smoke run)")
    numbers(p, (("batch", 16), ("seq", 128)))
    p.add_argument("--worker", choices=MODES, help="(internal) run one mode, print its JSON")
    args = p.parse_args(argv)
    if args.worker:
        return print(json.dumps(worker(args)))
    if args.render:
        return print(rerender(Path(args.out), "finetune_memory", render))
    if args.model != "default":
        need_file(args.model, "--model PATH (SmolLM2's GGUF) or --model default")
    import torch

    torch.set_num_threads(args.threads)  # so the recorded device line shows the workers' threads
    flags = [f"--{flag}={getattr(args, flag)}" for flag in ("model", "batch", "seq", "threads")]
    modes = {mode: run_worker(__file__, [f"--worker={mode}", *flags]) for mode in MODES}
    ratios = {f"{name}_{reading}": modes[a][f"{reading}_mb"] / modes[b][f"{reading}_mb"]
              for name, (a, b, readings) in RATIOS.items() for reading in readings}
    report = Report(args.out, "finetune_memory", render)
    report.state = {"benchmark": "F1", "model": Path(args.model).name, "batch": args.batch, "seq": args.seq,
                    "threads": args.threads, "modes": modes, "ratios": ratios, "env": environment(),
                    "command": command_line()}
    report.write()
    print(render(report.state))


if __name__ == "__main__":
    sys.exit(main())

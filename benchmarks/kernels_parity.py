"""Greedy tokens of a compressed model with the Triton kernels vs the torch references.

Issue 6 asks that a compressed SmolLM2-135M generate identical greedy tokens with kernels on and off. On a GPU this
runs the compiled kernels; without one, Triton's interpreter (TRITON_INTERPRET=1, set here before any kernel is
decorated) runs them on the CPU — slow (minutes per token for 210 factored linears), but the same kernel code.

  compressor compress SmolLM2-135M-Instruct.Q4_1.gguf --method svd-llm --rank 0.8 --out small/
  python benchmarks/kernels_parity.py small/ --new-tokens 6 --out reports/kernels_parity.md
"""

import argparse
import os
import time
from pathlib import Path

import torch
from harness import markdown, table, write_text

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a compressor checkpoint (folder with compression.json)")
    p.add_argument("--prompt", default="The history of the city")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--out", help="write a Markdown result here")
    args = p.parse_args(argv)

    from compressor.layers import compressed_layers
    from compressor.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    loaded = load_model(args.model, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    rows = {}
    for backend in ("ref", "triton"):
        os.environ["COMPRESSOR_KERNELS"] = backend
        started = time.perf_counter()
        tokens = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)  # generate runs under no_grad
        rows[backend] = (tokens, time.perf_counter() - started)
    mode = "compiled on " + torch.cuda.get_device_name() if device == "cuda" else "Triton interpreter on CPU"
    text = markdown(
        "# Greedy tokens with the Triton kernels vs the torch references",
        f"Model `{args.model}` ({len(compressed_layers(model))} compressed layers), prompt "
        f"{args.prompt!r}, {args.new_tokens} new tokens, Triton {mode}.",
        table(["backend", "seconds", "text"],
              [[b, f"{s:.1f}", repr(tokenizer.decode(t[0]))] for b, (t, s) in rows.items()]),
        f"Identical token ids: **{torch.equal(rows['ref'][0], rows['triton'][0])}**.")
    print(text)
    if args.out:
        write_text(Path(args.out), text)


if __name__ == "__main__":
    main()

"""Weight-only quantization rows on SmolLM2-135M: held-out perplexity against bytes on disk.

Protocol of benchmarks/frontier.py: calibration 32×256 tokens from the first half of wikitext-2
wiki.test.raw, perplexity on 16×512 tokens of its second half. The model is held in bfloat16 while
it is quantized (so the scales are chosen as the bf16 checkpoint stores them), then cast to
float32 for the perplexity (the exact values of the bf16 checkpoint). Bytes: the size of
model.safetensors written in bfloat16 (every stored tensor, embeddings and a tied lm_head once,
packed codes at one byte per byte), over the dense bf16 file.

Row labels: `dense`, or METHOD-wBITS-gGROUP[-asym][-ao][-rRANK][-eEBITS] with METHOD gptq or rtn,
GROUP 0 = per-channel, `ao` = act_order, rRANK = correction_rank (gptq), eEBITS = embedding_bits (the
input embedding and the tied lm_head, groups as the linears; `g` after it: by GPTQ against lm_head's
input Hessian, `embedding_gptq`). Rows are appended to
reports/quant_smollm2.json as each finishes; the .md table is rebuilt from it.

Example:  OMP_NUM_THREADS=1 python benchmarks/quant_smollm2.py --rows dense,rtn-w4-g64,gptq-w4-g64
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

REPORTS = Path(__file__).resolve().parent.parent / "reports"
DEFAULT_SMOLLM2 = "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "/work/shared/data/wikitext-2/wiki.test.raw"
LABEL = re.compile(r"(?P<method>gptq|rtn)-w(?P<bits>\d)-g(?P<group>\d+)(?P<asym>-asym)?(?P<ao>-ao)?(-r(?P<rank>\d+))?(-e(?P<emb>\d)(?P<eg>g)?)?$")


def stage_config(label: str, args):
    """The method config a row label names."""
    match = LABEL.match(label)
    if not match:
        sys.exit(f"error: row label {label!r} is not dense or METHOD-wBITS-gGROUP[-asym][-ao][-rRANK][-eEBITS]")
    fields = {"bits": int(match["bits"]), "group_size": int(match["group"]), "symmetric": not match["asym"],
              "embedding_bits": int(match["emb"] or 0)}
    if match["method"] == "rtn":
        from compressor.methods.rtn import RTNConfig

        return RTNConfig(**fields)
    from compressor.methods.gptq import GPTQConfig

    return GPTQConfig(**fields, act_order=bool(match["ao"]), correction_rank=int(match["rank"] or 0),
                      embedding_gptq=bool(match["eg"]),
                      calibration=WIKI, num_windows=args.calib_windows, seq_len=args.calib_seq, batch_size=8)


def disk_bytes(model, tokenizer) -> int:
    """Bytes of model.safetensors of `model` saved as a bfloat16 compressor checkpoint."""
    from compressor.models import save_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(model, tokenizer, Path(folder), dtype=torch.bfloat16)
        return (Path(folder) / "model.safetensors").stat().st_size


def run_row(label: str, dense, tokenizer, ctx, eval_windows, args) -> dict:
    from compressor import apply_
    from compressor.evaluation import perplexity

    started = time.perf_counter()
    model = copy.deepcopy(dense)
    metrics = {}
    if label != "dense":
        metrics = apply_(model, stage_config(label, args), ctx).metrics
    size = disk_bytes(model, tokenizer)
    ppl = perplexity(model.float(), eval_windows)
    row = {"label": label, "disk_bytes": size, "ppl": ppl["perplexity"], "eval_tokens": ppl["tokens"],
           "output_error": metrics.get("output_error"), "seconds": round(time.perf_counter() - started, 1)}
    print(f"{label}: ppl {row['ppl']:.3f}, {size} bytes ({row['seconds']} s)", flush=True)
    return row


def render(state: dict, path: Path) -> None:
    dense = next((r["disk_bytes"] for r in state["rows"] if r["label"] == "dense"), None)
    lines = [
        "# Weight-only quantization on SmolLM2-135M (benchmarks/quant_smollm2.py)", "",
        (f"Calibration: {state['calib']}; perplexity: {state['eval']}. Bytes: model.safetensors of the "
         "bfloat16 checkpoint (embeddings included, tied lm_head once) over the dense bfloat16 file. "
         "Quantized while held in bfloat16, evaluated in float32."), "",
        "| label | bytes on disk | bytes / dense bf16 | perplexity | mean output error | eval tokens |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(state["rows"], key=lambda r: -r["disk_bytes"]):
        ratio = f"{r['disk_bytes'] / dense:.3f}" if dense else "–"
        err = "–" if r.get("output_error") is None else f"{r['output_error']:.4f}"
        lines.append(f"| {r['label']} | {r['disk_bytes']} | {ratio} | {r['ppl']:.2f} | {err} | {r['eval_tokens']} |")
    lines += ["", ("Labels: METHOD-wBITS-gGROUP (symmetric unless `-asym`), `-ao` = act_order (static groups), "
                   "`-rN` = correction_rank N. Mean output error: the mean over layers of GPTQ's relative "
                   "calibration output error. llm-compressor 0.14 on these windows (reports/quant_peer.md, a "
                   "float32 model, scales kept in float32): dense 30.78, RTN int4 44.96, GPTQ int4 (actorder "
                   "static) 41.76, RTN int8 30.85, GPTQ int3 (actorder static) 185.73. rtn keeps, per group, "
                   "the storable bf16 scale (the nearest or a neighbour one unit in the last place away) with "
                   "the least squared error: rtn-w4-g64 measured 46.87 when every scale was rounded to "
                   "nearest, as gptq still does (rtn-w8-g64 was measured that way). `-eB`: the input "
                   "embedding and the tied lm_head (one table) rounded to nearest at B bits, groups of "
                   "GROUP; `-eBg`: that table by GPTQ against lm_head's input Hessian (`embedding_gptq`).")]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smollm2", default=DEFAULT_SMOLLM2)
    p.add_argument("--rows", default="dense,rtn-w4-g64,gptq-w4-g64")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-seq", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--out", default=str(REPORTS / "quant_smollm2"))
    args = p.parse_args(argv)

    from compressor.context import Context
    from compressor.models import load_model

    loaded = load_model(args.smollm2)
    dense = loaded.model.to(torch.bfloat16)
    ctx = Context(tokenizer=loaded.tokenizer, quiet=True)
    eval_windows = ctx.windows(WIKI, split="eval", seq_len=args.eval_seq, num_windows=args.eval_windows)
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    state = json.loads(json_path.read_text()) if json_path.exists() else {"rows": []}
    state.update(model=args.smollm2, calib=f"wiki.test.raw first half, {args.calib_windows}x{args.calib_seq} tokens",
                 eval=f"wiki.test.raw second half, {args.eval_windows}x{args.eval_seq} tokens")
    for label in args.rows.split(","):
        row = run_row(label, dense, loaded.tokenizer, ctx, eval_windows, args)
        state["rows"] = [r for r in state["rows"] if r["label"] != label] + [row]
        json_path.write_text(json.dumps(state, indent=2) + "\n")
        render(state, out.with_suffix(".md"))


if __name__ == "__main__":
    main()

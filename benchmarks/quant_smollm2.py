"""Weight-only quantization rows on SmolLM2-135M: held-out perplexity against bytes on disk.

Protocol of benchmarks/frontier.py (calibration windows of the first half of wikitext-2 wiki.test.raw, perplexity
on windows of its second half); the report states the sizes and how the bytes are counted. Row labels: `dense` or
METHOD-wBITS-gGROUP[-asym][-ao][-rRANK][-eEBITS[g]] (GROUP 0 = per-channel; the report's legend reads each part).
"""

import copy
import re
import sys
import tempfile
import time
from pathlib import Path

from harness import (Report, apply_method, arguments, calib_fields, columns, eval_windows, fmt, load, markdown,
                     need_file, numbers, rerender, sizes_of, wiki)

LABEL = re.compile(r"(?P<method>gptq|rtn)-w(?P<bits>\d)-g(?P<group>\d+)(?P<asym>-asym)?(?P<ao>-ao)?"
                   r"(-r(?P<rank>\d+))?(-e(?P<emb>\d)(?P<eg>g)?)?$")


def stage_fields(label: str, args) -> tuple[str, dict]:
    """The method and config fields a row label names."""
    match = LABEL.match(label)
    if not match:
        sys.exit(f"error: row label {label!r} is not dense or METHOD-wBITS-gGROUP[-asym][-ao][-rRANK][-eEBITS]")
    fields = {"bits": int(match["bits"]), "group_size": int(match["group"]), "symmetric": not match["asym"],
              "embedding_bits": int(match["emb"] or 0)}
    if match["method"] == "gptq":
        calibration = calib_fields(wiki(args.data_dir), args.calib_windows, args.calib_seq)
        fields.update(calibration, act_order=bool(match["ao"]), correction_rank=int(match["rank"] or 0),
                      embedding_gptq=bool(match["eg"]))
    return match["method"], fields


def run_row(label: str, dense, tokenizer, ctx, windows, args) -> dict:
    """Quantize a copy (held in bfloat16), its bf16 model.safetensors' size, its float32 perplexity."""
    import torch

    from compressor.evaluation import perplexity
    from compressor.models import save_checkpoint

    started, model = time.perf_counter(), copy.deepcopy(dense)
    metrics = apply_method(model, *stage_fields(label, args), ctx)[0].metrics if label != "dense" else {}
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(model, tokenizer, Path(folder), dtype=torch.bfloat16)
        size = (Path(folder) / "model.safetensors").stat().st_size
    ppl = perplexity(model.float(), windows)
    row = {"disk_bytes": size, "ppl": ppl["perplexity"], "eval_tokens": ppl["tokens"],
           "output_error": metrics.get("output_error"), "seconds": round(time.perf_counter() - started, 1)}
    print(f"{label}: ppl {row['ppl']:.3f}, {size} bytes ({row['seconds']} s)", flush=True)
    return row


def render(state: dict) -> str:
    dense = next((r["disk_bytes"] for r in state["rows"] if r["label"] == "dense"), None)
    spec = [("label", "{label}"), ("bytes on disk", "{disk_bytes}"),
            ("bytes / dense bf16", lambda r: f"{r['disk_bytes'] / dense:.3f}" if dense else "–"),
            ("perplexity", "{ppl:.2f}"), ("mean output error", lambda r: fmt(r.get("output_error"), 4)),
            ("eval tokens", "{eval_tokens}")]
    return markdown(
        "# Weight-only quantization on SmolLM2-135M (benchmarks/quant_smollm2.py)",
        "Calibration: wiki.test.raw first half, {calib_windows}x{calib_seq} tokens; perplexity: wiki.test.raw second "
        "half, {eval_windows}x{eval_seq} tokens. Bytes: model.safetensors of the bfloat16 checkpoint (embeddings "
        "included, tied lm_head once) over the dense bfloat16 file. Quantized while held in bfloat16, evaluated in "
        "float32.".format_map(state["sizes"]),
        columns(spec, sorted(state["rows"], key=lambda r: -r["disk_bytes"])),
        "Labels: METHOD-wBITS-gGROUP (symmetric unless `-asym`), `-ao` = act_order (static groups), "
        "`-rN` = correction_rank N. Mean output error: the mean over layers of GPTQ's relative "
        "calibration output error. llm-compressor 0.14 on these windows (reports/quant_peer.md, a "
        "float32 model, scales kept in float32): dense 30.78, RTN int4 44.96, GPTQ int4 (actorder "
        "static) 41.76, RTN int8 30.85, GPTQ int3 (actorder static) 185.73. rtn keeps, per group, "
        "the storable bf16 scale (the nearest or a neighbour one unit in the last place away) with "
        "the least squared error: rtn-w4-g64 measured 46.87 when every scale was rounded to "
        "nearest, as gptq still does (rtn-w8-g64 was measured that way). `-eB`: the input "
        "embedding and the tied lm_head (one table) rounded to nearest at B bits, groups of "
        "GROUP; `-eBg`: that table by GPTQ against lm_head's input Hessian (`embedding_gptq`).")


def main(argv=None) -> None:
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    numbers(p, (("calib-windows", 32), ("calib-seq", 256), ("eval-windows", 16), ("eval-seq", 512)))
    args = p.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "quant_smollm2", render))
    need_file(args.smollm2, "--smollm2 PATH")
    import torch

    torch.set_num_threads(args.threads)
    loaded, ctx = load(args.smollm2)
    dense = loaded.model.to(torch.bfloat16)
    windows = eval_windows(ctx, wiki(args.data_dir), args.eval_seq, args.eval_windows)
    report, sizes = Report(args.out, "quant_smollm2", render), sizes_of(args)
    report.begin(sizes, model=Path(args.smollm2).name)
    for label in (args.rows or "dense,rtn-w4-g64,gptq-w4-g64").split(","):
        if report.cached(label, sizes, args.force) is None:
            report.add(label, sizes, run_row(label, dense, loaded.tokenizer, ctx, windows, args))


if __name__ == "__main__":
    main()

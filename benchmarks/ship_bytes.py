"""Bytes of a compressed checkpoint against a dense copy of the same model in the same dtype.

    python benchmarks/ship_bytes.py --checkpoint OUT [--source MODEL]

OUT is a `compressor compress` output (its report.json names the source and the dtype). The script
writes a dense copy of the source in that dtype (save_pretrained, safetensors, tied embeddings once)
to a temporary folder and compares file sizes. Writes reports/ship_bytes.{json,md}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from harness import Report, arguments, environment, rerender

DEFAULT_CHECKPOINT = "/tmp/ship-smol-saes"


def tensor_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def measure(checkpoint: Path, source: str | None) -> dict:
    import torch

    from compressor.dtypes import parse_dtype
    from compressor.models import load_model, read_manifest, save_checkpoint

    report = json.loads((checkpoint / "report.json").read_text())
    size = report["size"]
    source = source or report["run"]["model"]
    loaded = load_model(source)
    dense_file = None
    with tempfile.TemporaryDirectory(prefix="ship-bytes-") as tmp:
        save_checkpoint(loaded.model, None, Path(tmp), None, parse_dtype(size["dtype"]))
        dense_file = (Path(tmp) / "model.safetensors").stat().st_size
        dense_keys = tensor_keys(Path(tmp) / "model.safetensors")
    ckpt_file = (checkpoint / "model.safetensors").stat().st_size
    keys = tensor_keys(checkpoint / "model.safetensors")
    layers = (read_manifest(checkpoint) or {}).get("layers", {})
    return {"source": source, "dtype": size["dtype"], "report_size": size,
            "checkpoint_bytes": ckpt_file, "dense_same_dtype_bytes": dense_file,
            "ratio_to_dense": ckpt_file / dense_file,
            "source_file_bytes": size["before"].get("disk_bytes"),
            "factored_layers": sum(s["type"] == "low_rank" for s in layers.values()),
            "lm_head_stored": any(k.startswith("lm_head") for k in keys),
            "dense_lm_head_stored": any(k.startswith("lm_head") for k in dense_keys),
            "tied": bool(getattr(loaded.model.config, "tie_word_embeddings", False)),
            "torch": torch.__version__,
            "method": report["stages"][0]["stage"], "stage_config": report["stages"][0]["config"]}


def render(r: dict) -> str:
    mb = 1e6
    s = r["report_size"]
    rows = [f"| {label} | {s['before'].get(k, 'n/a')} | {s['after'].get(k, 'n/a')} | "
            f"{s['ratio'].get(k, float('nan')):.3f} |"
            for k, label in (("parameters", "parameters"), ("memory_bytes", "in-memory bytes"),
                             ("disk_bytes", "on-disk bytes"))]
    return "\n".join([
        "# Checkpoint bytes (issue 10 item 1)\n",
        (f"{r['method']} on `{r['source']}`, written in {r['dtype']} (dtype auto: a quantized GGUF source is written in bfloat16); "
        f"stage config: `{json.dumps({k: v for k, v in r['stage_config'].items() if k in ('rank', 'num_windows', 'seq_len', 'allocation')})}`. "
        f"{r['env']['date']}, {r['env']['host']}, git {r['env']['git']}, torch {r['torch']}.\n"),
        "| file | bytes | MB |", "|---|---|---|",
        f"| compressed model.safetensors | {r['checkpoint_bytes']} | {r['checkpoint_bytes'] / mb:.1f} |",
        (f"| dense {r['dtype']} model.safetensors (same model, save_pretrained) | {r['dense_same_dtype_bytes']} | "
        f"{r['dense_same_dtype_bytes'] / mb:.1f} |"),
        f"| source file (GGUF) | {r['source_file_bytes']} | {(r['source_file_bytes'] or 0) / mb:.1f} |\n",
        (f"**compressed / dense {r['dtype']} = {r['ratio_to_dense']:.3f}** (target <= 0.72). "
        f"{r['factored_layers']} linears factored. Tied embeddings: {r['tied']}; lm_head stored separately: "
        f"{r['lm_head_stored']} (dense copy: {r['dense_lm_head_stored']}), i.e. the embedding matrix is written once.\n"),
        "The run's own report (before = the dense source in its dtype, after = the written checkpoint):\n",
        "| figure | before | after | after/before |", "|---|---|---|---|", *rows, "",
        ("The on-disk `before` is the GGUF file (4-bit Q4_1 weights), so its ratio compares a bfloat16 "
        "checkpoint with a 4-bit file; the dense bfloat16 copy above is the like-for-like baseline.\n"),
    ])


def main(argv=None) -> None:
    p = arguments(__doc__, threads=None)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a compressor compress output folder")
    p.add_argument("--source", default=None, help="the source model (default: the one report.json names)")
    args = p.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "ship_bytes", render))
    env = environment()
    report = Report(args.out, "ship_bytes", render)
    report.state = {**measure(Path(args.checkpoint), args.source),
                    "env": {"date": env["date"], "host": env["host"], "git": env["git_sha"][:10]}}
    report.write()
    print(render(report.state))


if __name__ == "__main__":
    main()

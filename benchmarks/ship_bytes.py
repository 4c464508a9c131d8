"""Bytes of a compressed checkpoint against a dense copy of the same model in the same dtype.

--checkpoint is a `compressor compress` output (its report.json names the source and the dtype); a dense
copy of the source in that dtype (save_pretrained, safetensors, tied embeddings once) is written to a
temporary folder and the file sizes compared.
"""

import json
import tempfile
from pathlib import Path

from harness import Report, arguments, environment, fmt, markdown, rerender, table


def measure(checkpoint: Path, source: str | None) -> dict:
    """The checkpoint's file against a dense copy of its source written in its dtype."""
    from safetensors import safe_open

    from compressor.dtypes import parse_dtype
    from compressor.models import load_model, read_manifest, save_checkpoint

    def file_facts(path: Path) -> tuple[int, bool]:
        """The file's bytes and whether it stores an lm_head tensor (a tied one is not stored)."""
        with safe_open(str(path), "pt") as f:
            return path.stat().st_size, any(k.startswith("lm_head") for k in f.keys())  # noqa: SIM118 (no __iter__)

    report = json.loads((checkpoint / "report.json").read_text())
    size, source = report["size"], source or report["run"]["model"]
    loaded = load_model(source)
    with tempfile.TemporaryDirectory(prefix="ship-bytes-") as tmp:
        save_checkpoint(loaded.model, None, Path(tmp), None, parse_dtype(size["dtype"]))
        dense_file, dense_lm_head = file_facts(Path(tmp) / "model.safetensors")
    ckpt_file, ckpt_lm_head = file_facts(checkpoint / "model.safetensors")
    layers = (read_manifest(checkpoint) or {}).get("layers", {})
    return {"source": source, "dtype": size["dtype"], "report_size": size, "checkpoint_bytes": ckpt_file,
            "dense_same_dtype_bytes": dense_file, "ratio_to_dense": ckpt_file / dense_file,
            "source_file_bytes": size["before"].get("disk_bytes"), "dense_lm_head_stored": dense_lm_head,
            "factored_layers": sum(s["type"] == "low_rank" for s in layers.values()), "lm_head_stored": ckpt_lm_head,
            "tied": bool(getattr(loaded.model.config, "tie_word_embeddings", False)),
            "method": report["stages"][0]["stage"], "stage_config": report["stages"][0]["config"]}


def render(r: dict) -> str:
    s, config = r["report_size"], {k: v for k, v in r["stage_config"].items()
                                   if k in ("rank", "num_windows", "seq_len", "allocation")}
    files = [("compressed model.safetensors", r["checkpoint_bytes"]),
             (f"dense {r['dtype']} model.safetensors (same model, save_pretrained)", r["dense_same_dtype_bytes"]),
             ("source file (GGUF)", r["source_file_bytes"])]
    figures = {"parameters": "parameters", "in-memory bytes": "memory_bytes", "on-disk bytes": "disk_bytes"}
    return markdown(
        "# Checkpoint bytes (issue 10 item 1)",
        f"{r['method']} on `{r['source']}`, written in {r['dtype']} (dtype auto: a quantized GGUF source is written "
        f"in bfloat16); stage config: `{json.dumps(config)}`. {r['env']['date']}, {r['env']['host']}, git "
        f"{r['env']['git']}, torch {r['torch']}.",
        table(["file", "bytes", "MB"], [[name, n, f"{(n or 0) / 1e6:.1f}"] for name, n in files]),
        f"**compressed / dense {r['dtype']} = {r['ratio_to_dense']:.3f}** (target <= 0.72). {r['factored_layers']} "
        f"linears factored. Tied embeddings: {r['tied']}; lm_head stored separately: {r['lm_head_stored']} (dense "
        f"copy: {r['dense_lm_head_stored']}), i.e. the embedding matrix is written once.",
        "The run's own report (before = the dense source in its dtype, after = the written checkpoint):",
        table(["figure", "before", "after", "after/before"],
              [[name, s["before"].get(k, "n/a"), s["after"].get(k, "n/a"), fmt(s["ratio"].get(k), 3, "nan")]
               for name, k in figures.items()]),
        "The on-disk `before` is the GGUF file (4-bit Q4_1 weights), so its ratio compares a bfloat16 "
        "checkpoint with a 4-bit file; the dense bfloat16 copy above is the like-for-like baseline.")


def main(argv=None) -> None:
    p = arguments(__doc__, threads=None)
    p.add_argument("--checkpoint", default="/tmp/ship-smol-saes", help="a compressor compress output folder")
    p.add_argument("--source", default=None, help="the source model (default: the one report.json names)")
    args = p.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "ship_bytes", render))
    env, report = environment(), Report(args.out, "ship_bytes", render)
    report.state = {**measure(Path(args.checkpoint), args.source), "torch": env["versions"]["torch"],
                    "env": {"date": env["date"], "host": env["host"], "git": env["git_sha"][:10]}}
    report.write()
    print(render(report.state))


if __name__ == "__main__":
    main()

"""QF peer rows (issue 19): llm-compressor's weight-only int quantization of SmolLM2-135M on our protocol.

Runs in llm-compressor's own venv and imports no compressor (benchmarks/README.md sets it up).
Rows: dense; RTN (QuantizationModifier) and GPTQ (GPTQModifier, its defaults), symmetric int weights
in groups of 64, every Linear but the tied lm_head, on the windows of benchmarks/frontier.py.
Each row: perplexity of the fake-quantized model in memory and after a compressed-tensors save +
reload, and the bytes of that save (the report says how they are counted).
"""

import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (ROOT, Report, arguments, columns, finite, log, markdown, need_file, numbers, pick,
                    rerender, sizes_of, wiki)

# (label, llm-compressor modifier or None for dense, weight bits); run in this order.
ROWS = [("dense", None, None), ("rtn-int4-g64", "QuantizationModifier", 4), ("gptq-int4-g64", "GPTQModifier", 4),
        ("rtn-int8-g64", "QuantizationModifier", 8), ("gptq-int3-g64", "GPTQModifier", 3)]
GROUP_SIZE = 64
PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors")  # the report's provenance line
# issue 19's table (llm-compressor 0.14, its own held-out split, dense 26.84 there)
ISSUE_TABLE = {"dense": 26.84, "rtn-int8-g64": 26.94, "gptq-int4-g64": 37.07, "rtn-int4-g64": 39.13,
               "gptq-int3-g64": 175.3}


def load_plain_smollm2(gguf: Path):
    """The GGUF dequantized by transformers, rebuilt as a plain float32 LlamaForCausalLM (a model
    loaded from GGUF refuses save_pretrained, which llm-compressor's save needs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = Path(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):  # lm_head is tied to the embedding
        sys.exit(f"error: the GGUF weights do not fit LlamaForCausalLM (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.eval(), tokenizer


def halves_windows(tokenizer, path: Path, sizes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """compressor.data for a .txt source (the whole file one document, CRLF normalised, tokenized with
    special tokens, no EOS appended), split_stream + make_windows: calibration = the first windows of
    the first half, in order (sparse_p1's start_windows); evaluation = the first windows of the second."""
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    stream = torch.tensor(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    cut = int(len(stream) * 0.5)
    windows = []
    for part, what in ((stream[:cut], "calib"), (stream[cut:], "eval")):
        seq_len, count = sizes[f"{what}_seq"], sizes[f"{what}_windows"]
        if len(part) // seq_len < count:
            sys.exit(f"error: the {what} half holds only {len(part) // seq_len} windows of {seq_len}; ask for fewer")
        windows.append(part[: count * seq_len].view(count, seq_len))
    return windows[0], windows[1]


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """compressor.evaluation.perplexity: exp(mean next-token NLL over every window position)."""
    model.eval()
    total_nll = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total_nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
    return math.exp(total_nll / windows[:, 1:].numel())


def quantize(model, tokenizer, modifier: str, bits: int, calib: torch.Tensor, plain_dir: str) -> None:
    """llm-compressor's oneshot on `model` in place with the fixed calibration windows: symmetric int
    `bits` weights in groups of GROUP_SIZE, float activations, lm_head ignored."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import quantization

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = getattr(quantization, modifier)(config_groups={"group_0": scheme}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    model.config._name_or_path = plain_dir  # oneshot re-reads the config from there
    oneshot(model=model, dataset=data, processor=tokenizer, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)


def checkpoint_bytes(folder: Path) -> dict:
    """Bytes of every tensor in the folder's safetensors, floats at 2 B (bf16), integers at their
    width, plus the files' size on disk. The tied lm_head is saved once (llm-compressor re-ties
    it on save); `lm_head_stored` records whether a separate copy was written."""
    from safetensors import safe_open

    stored, names, dtypes, files = 0, [], Counter(), sorted(folder.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                piece = handle.get_slice(name)
                dtype, numel = piece.get_dtype(), math.prod(piece.get_shape())
                stored += numel * (2 if dtype in ("F32", "F16", "BF16", "F64") else int(dtype.lstrip("IU")) // 8)
                names.append(name)
                dtypes[dtype] += numel
    return {"stored_bytes": stored, "file_bytes": sum(path.stat().st_size for path in files), "tensors": len(names),
            "dtype_values": dict(dtypes),
            "lm_head_stored": any(n.startswith("lm_head") for n in names)}


def run_row(dense, tokenizer, label: str, modifier: str | None, bits: int | None, calib, windows, plain_dir) -> dict:
    """One row: quantize a copy, perplexity in memory, bytes of its compressed-tensors save, and the
    perplexity of that save reloaded by transformers (decompressed to float on load)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, started = copy.deepcopy(dense), time.perf_counter()
    if modifier is not None:
        quantize(model, tokenizer, modifier, bits, calib, plain_dir)
    seconds = time.perf_counter() - started
    row = {"modifier": modifier or "dense", "bits": bits, "group_size": GROUP_SIZE if bits else None,
           "symmetric": True if bits else None, "ppl": finite(label, perplexity(model, windows)),
           "seconds": round(seconds, 1)}
    if modifier is not None:  # `k/n`: Linear modules carrying a weight quantization scheme
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        schemed = sum(getattr(m, "quantization_scheme", None) is not None for m in linears)
        row["linear_weights_quantized"] = f"{schemed}/{len(linears)}"
    with tempfile.TemporaryDirectory(prefix="quant_peer_") as folder:
        model.save_pretrained(folder)  # llm-compressor's wrapper: compressed-tensors when quantized
        row.update(checkpoint_bytes(Path(folder)))
        row["format"] = json.loads((Path(folder) / "config.json").read_text()).get(
            "quantization_config", {}).get("format", "dense")
        del model
        if modifier is not None:
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=
                                                            CompressedTensorsConfig(dequantize=True))
            row["ppl_reloaded"] = finite(f"{label} (reloaded)", perplexity(reloaded, windows))
    log(f"{label:16s} ppl {row['ppl']:9.3f}  reloaded {row.get('ppl_reloaded', float('nan')):9.3f}  "
        f"bytes {row['stored_bytes']:,}  {seconds:.0f}s")
    return row


def value_counts(model: torch.nn.Module) -> dict:
    """Values the quantized rows store as codes (every Linear weight but lm_head) and every other
    stored value (embedding, norms; a tied tensor once): the analytic byte count's inputs."""
    quantized = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and name != "lm_head")
    tensors = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    return {"quantized_linear": quantized, "other": sum(tensors.values()) - quantized}


def environment() -> dict:
    """harness.environment without compressor (not in this venv)."""
    from importlib.metadata import version

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "git_sha": git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "benchmarks") else ""),
            "python": platform.python_version(), "versions": {name: version(name) for name in PACKAGES},
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}


def render(result: dict) -> str:
    env, s = result["env"], result["sizes"]
    dense = next((r for r in result["rows"] if r["label"] == "dense"), None)
    spec = [("row", "{label}"), ("perplexity (in memory)", "{ppl:.2f}"),
            ("after compressed save + reload", lambda r: f"{r['ppl_reloaded']:.2f}" if "ppl_reloaded" in r else "–"),
            ("/ dense", lambda r: f"{r['ppl'] / dense['ppl']:.3f}" if dense else "–"),
            ("issue 19 table", lambda r: ISSUE_TABLE.get(r["label"], "–")),
            ("stored MB", lambda r: f"{r['stored_bytes'] / 1e6:.1f}"),
            ("bytes / dense bf16", lambda r: f"{r['stored_bytes'] / dense['stored_bytes']:.3f}" if dense else "–"),
            ("file MB", lambda r: f"{r['file_bytes'] / 1e6:.1f}"), ("format", "{format}"), ("seconds", "{seconds:.0f}")]
    missing = [label for label, _, _ in ROWS if label not in {r["label"] for r in result["rows"]}]
    return markdown(
        "# QF peer: llm-compressor weight-only int quantization of SmolLM2-135M, WikiText-2 (issue 19)",
        f"Run {env['date']} on {env['host']}, git {env['git_sha']}, python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, torch threads {env['torch_threads']}. "
        "Script: benchmarks/quant_peer.py in its own venv.",
        f"Model: {result['model']} rebuilt as a plain float32 LlamaForCausalLM. Calibration: the first "
        f"{s['calib_windows']} x {s['calib_seq']} tokens of the first half of wiki.test.raw. Evaluation: "
        f"{s['eval_windows']} non-overlapping windows of {s['eval_seq']} tokens from the start of the second "
        f"half ({result['eval_tokens_scored']} tokens scored) — the windows of reports/frontier.md and "
        "reports/sparse_p1.md. Symmetric int weights in groups of 64, float activations, every Linear but "
        "the tied lm_head; GPTQ with llm-compressor's defaults (block 128, dampening 0.01, actorder static).",
        "Bytes: counted from each saved checkpoint's safetensors (compressed-tensors for the quantized "
        "rows): every stored tensor once, floating values (embedding, norms, group scales) at 2 bytes as bfloat16, "
        "integer tensors (packed codes, weight shapes) at their width; `file MB` is the files' real size "
        "(llm-compressor writes this float32 model's embedding and scales in float32).",
        columns(spec, result["rows"]),
        [*result.get("notes", []), *([f"- Not run: {', '.join(missing)}."] if missing else [])])


def protocol_notes(result: dict, frontier: Path) -> list[str]:
    """What the rows say against the frontier's dense row, issue 19's targets and the analytic bytes."""
    rows = {r["label"]: r for r in result["rows"]}
    dense, counts, notes = rows.get("dense"), result.get("value_counts"), []
    data = json.loads(frontier.read_text()) if frontier.is_file() else {"rows": []}
    other = next((r["ppl"] for r in data["rows"] if r["label"] == "dense"), None)
    if dense and other is not None:  # the protocol check: the same windows give the same dense perplexity
        notes.append(f"- Protocol check: dense perplexity {dense['ppl']:.4f} here "
                     f"{'equals' if abs(dense['ppl'] - other) < 0.01 else 'DIFFERS FROM'} "
                     f"reports/frontier.json's dense row {other:.4f}.")
    notes += ["- Seconds are one run on a shared 2-core machine: indicative only, not a speed result.",
              ("- The issue 19 table's perplexities were measured on a held-out split of their own "
               "(dense 26.84 there); compare our rows with this report's, which share the frontier's windows.")]
    if gptq := rows.get("gptq-int4-g64"):
        notes.append(f"- On these windows issue 19's parity target for GPTQ W4 g64 is <= 1.02 x {gptq['ppl']:.2f} = "
                     f"{1.02 * gptq['ppl']:.2f}, and its <= 0.30x-bytes target is perplexity <= {gptq['ppl']:.2f}.")
    if rtn := rows.get("rtn-int4-g64"):
        notes.append(f"- RTN W4 g64 within 1 % of the peer: {0.99 * rtn['ppl']:.2f} to {1.01 * rtn['ppl']:.2f}.")
    for r in [r for r in result["rows"] if counts and r["bits"]]:
        # bits/8 bytes per code, one 2-byte scale per group of GROUP_SIZE, other values at 2 bytes
        scales = counts["quantized_linear"] // GROUP_SIZE * 2
        expected = counts["quantized_linear"] * r["bits"] // 8 + scales + counts["other"] * 2
        wider = (f" With the scales at 32 bits, as written: {(r['stored_bytes'] + scales) / dense['stored_bytes']:.3f}"
                 " of dense bf16." if dense else "")
        notes.append(f"- Analytic check, {r['label']}: {counts['quantized_linear']:,} codes at "
                     f"{r['bits']} bits + one bf16 scale per {GROUP_SIZE} + {counts['other']:,} other "
                     f"values at 2 bytes = {expected:,} bytes; the checkpoint holds "
                     f"{r['stored_bytes'] - expected:,} more, and its int64 tensors (`weight_shape`) "
                     f"take {r['dtype_values'].get('I64', 0) * 8:,}." + wider)
    return notes


def main(argv: list[str] | None = None) -> None:
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    numbers(p, (("calib-windows", 32), ("calib-seq", 256), ("eval-windows", 16), ("eval-seq", 512)))
    args = p.parse_args(argv)
    if args.render:
        return print(rerender(Path(args.out), "quant_peer", render))
    torch.set_num_threads(args.threads)
    need_file(args.smollm2, "--smollm2 PATH")
    need_file(wiki(args.data_dir), "--data-dir DIR (holding wikitext-2/wiki.test.raw)")
    wanted, sizes = pick(args.rows, [label for label, _, _ in ROWS]), sizes_of(args)
    dense, tokenizer = load_plain_smollm2(args.smollm2)
    calib, windows = halves_windows(tokenizer, Path(wiki(args.data_dir)), sizes)
    report = Report(args.out, "quant_peer", render)
    report.begin(sizes, benchmark="quant_peer", env=environment(), model=Path(args.smollm2).name,
                 eval_tokens_scored=int(windows[:, 1:].numel()), value_counts=value_counts(dense))
    with tempfile.TemporaryDirectory(prefix="quant_peer_plain_") as plain_dir:
        dense.config.save_pretrained(plain_dir)
        for label, modifier, bits in [row for row in ROWS if row[0] in wanted]:
            if report.cached(label, sizes, args.force) is None:
                report.add(label, sizes, run_row(dense, tokenizer, label, modifier, bits, calib, windows, plain_dir))
                report.state["notes"] = protocol_notes(report.state, Path(args.out) / "frontier.json")
                report.write()


if __name__ == "__main__":
    main()

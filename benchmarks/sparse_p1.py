"""P1 (BENCHMARKS.md): 2:4 and 50 % pruning of SmolLM2-135M, and dsformer at the bytes of 2:4.

Protocol (the one of the llm-compressor comparison in issue 14): a plain HF copy of the model in
float32; calibration = the first 32 x 256 tokens of WikiText-2 test (`wiki.test.raw`, read with
newline="" and CRLF normalised, by compressor.data); perplexity on non-overlapping windows of the
second half of the same file (disjoint from the calibration tokens). Every row compresses a fresh
copy of the dense model; every number is measured in this run.

Stored bytes count every parameter and persistent buffer of the model once (tied embeddings once,
embeddings included) as the checkpoint would hold it with values in bfloat16: 2 bytes per floating
value, integer buffers (the N:M and dsformer index metadata) at their own width. Unstructured
pruning stores its zeros densely, so it saves no bytes.

Writes reports/sparse_p1.{json,md} and reports/frontier_sparse.json (rows for benchmarks/frontier.py)
after every row; `--resume` keeps the rows of an earlier run with the same sizes.

Example:  nice -n 5 nohup python benchmarks/sparse_p1.py > /tmp/sparse-bench.log 2>&1 &
          python benchmarks/sparse_p1.py --rows dense,sparsegpt-2:4 --eval-windows 4   (quick look)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from compressor.context import Context
from compressor.data import windows_for
from compressor.evaluation import perplexity
from compressor.models import load_model
from compressor.registry import get_method
from compressor.report.env import collect_env

DEFAULT_SMOLLM2 = "/work/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = "/work/shared/data"
REPORTS = Path(__file__).resolve().parent.parent / "reports"
# llm-compressor 0.14 on the same model and protocol (issue 14's table; held-out split of its own).
PEER = {"dense": 26.8, "wanda-2:4": 155.0, "sparsegpt-2:4": 78.5}
# (label, method, config fields beyond calibration): run in this order.
ROWS = [
    ("dense", None, {}),
    ("sparsegpt-2:4", "prune", {"score": "sparsegpt", "pattern": "2:4"}),
    ("wanda-2:4", "prune", {"score": "wanda", "pattern": "2:4"}),
    ("magnitude-2:4", "prune", {"score": "magnitude", "pattern": "2:4"}),
    ("sparsegpt-50%", "prune", {"score": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5}),
    ("wanda-50%", "prune", {"score": "wanda", "pattern": "unstructured", "sparsity": 0.5}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", default=os.environ.get("COMPRESSOR_DATA", DEFAULT_DATA))
    p.add_argument("--smollm2", default=os.environ.get("COMPRESSOR_SMOLLM2", DEFAULT_SMOLLM2))
    p.add_argument("--rows", default=None, help="comma-separated row labels (default: all)")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-seq", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)  # the sizes of reports/sparse_p1*.json
    p.add_argument("--eval-seq", type=int, default=512)
    p.add_argument("--ds-stf-steps", type=int, default=100, help="dsformer STF steps")
    p.add_argument("--ds-stf-batch", type=int, default=1, help="windows per STF step")
    p.add_argument("--ds-lr", type=float, default=1e-4, help="dsformer STF learning rate")
    p.add_argument("--ds-init-iters", type=int, default=2, help="dsformer init alternations")
    p.add_argument("--ds-coding", default="sparsegpt", help="dsformer sparse coding rule")
    p.add_argument("--heal-steps", type=int, default=0,
                   help="heal rows `<label>+heal` (every row with --rows unset) with this many steps; 0 = none")
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--heal-seq", type=int, default=256)
    p.add_argument("--heal-lr", type=float, default=3e-4)
    p.add_argument("--heal-loss", choices=("kl", "lm"), default="kl")
    p.add_argument("--heal-lora-r", type=int, default=0)
    p.add_argument("--heal-eval-every", type=int, default=0, help="held-out perplexity every N heal steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep rows of a run with the same sizes")
    p.add_argument("--out", default=str(REPORTS))
    p.add_argument("--tag", default="", help="report name suffix: sparse_p1_<tag>.{json,md}")
    return p.parse_args(argv)


class FixedCalibration(Context):
    """A Context whose calibration windows are fixed (the start of the text, as the peer run used)
    instead of compressor.data's seeded random subset of the calibration half."""

    def __init__(self, calib: torch.Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calib = calib

    def windows(self, source="default", *, split="calib", **kwargs) -> torch.Tensor:
        return self.calib if split == "calib" else super().windows(source, split=split, **kwargs)


def start_windows(tokenizer, source: str, num: int, seq_len: int) -> torch.Tensor:
    """The first num x seq_len tokens of the calibration half (= of the file), in order."""
    stream = windows_for(tokenizer, source, split="calib", seq_len=seq_len)
    if stream.shape[0] < num:
        sys.exit(f"the calibration half holds only {stream.shape[0]} windows of {seq_len}")
    return stream[:num]


def stored_bytes(model: torch.nn.Module, value_bytes: int = 2) -> int:
    """Bytes of every parameter and persistent buffer, each storage once; floats at value_bytes."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        width = value_bytes if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * width
    return total


def run_row(
    dense, ctx, label, method, fields, source, sizes, eval_windows, copy_model: bool = True
) -> tuple[dict, torch.nn.Module]:
    """Compress a copy of `dense` (or `dense` itself) with one configuration; measure it.
    Returns the row and the compressed model."""
    model = copy.deepcopy(dense) if copy_model else dense
    started = time.perf_counter()
    metrics = {}
    if method is not None:
        cls = get_method(method).config_cls
        config = cls.from_dict(
            {
                "calibration": source,
                "num_windows": sizes["calib_windows"],
                "seq_len": sizes["calib_seq"],
                **fields,
            }
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metrics = get_method(method).apply(model, config, ctx).metrics
    seconds = time.perf_counter() - started
    value = float(perplexity(model, eval_windows, batch_size=4)["perplexity"])
    if not torch.isfinite(torch.tensor(value)):
        sys.exit(f"error: row {label} gave a non-finite perplexity {value}")
    row = {
        "label": label,
        "method": method or "dense",
        "fields": fields,
        "ppl": value,
        "stored_bytes": stored_bytes(model),
        "seconds": round(seconds, 1),
        **{k: metrics[k] for k in METRIC_KEYS if k in metrics},
    }
    log(f"{label:20s} ppl {value:10.3f}  bytes {row['stored_bytes']:,}  {seconds:.0f}s")
    return row, model


def heal_row(model, dense, ctx, base: dict, source, eval_windows, args) -> dict:
    """Heal the compressed `model` of row `base` (benchmarks/frontier.py's heal, same budget
    flags) and measure it: the row `<label>+heal`."""
    from frontier import heal_row as frontier_heal  # the one heal protocol of the frontier

    info = frontier_heal(model, dense, source, args, ctx, eval_windows)
    value = float(perplexity(model, eval_windows, batch_size=4)["perplexity"])
    if not torch.isfinite(torch.tensor(value)):
        sys.exit(f"error: row {base['label']}+heal gave a non-finite perplexity {value}")
    label = f"{base['label']}+heal"
    log(f"{label:20s} ppl {value:10.3f}  {info['heal_seconds']:.0f}s")
    return {**base, **info, "label": label, "ppl": value, "ppl_before_heal": base["ppl"],
            "stored_bytes": stored_bytes(model), "seconds": info["heal_seconds"]}

METRIC_KEYS = (
    "sparsity",
    "output_error",
    "output_error_mask_only",
    "keep_ratio_bytes",
    "mean_fit_error",
)


def render(result: dict) -> str:
    s = result["sizes"]
    env = result["env"]
    dense = next((r for r in result["rows"] if r["label"] == "dense"), None)
    lines = [
        "# P1: pruning SmolLM2-135M (2:4 and 50 % unstructured), WikiText-2",
        "",
        f"Run {env['date']} on {env['host']} ({env['device_name']}), git {env['git_sha']}, "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}.",
        "",
        f"Model: {result['model']} loaded as a plain HF LlamaForCausalLM in float32. Calibration: the "
        f"first {s['calib_windows']} x {s['calib_seq']} tokens of wiki.test.raw. Evaluation: "
        f"{result['eval_tokens']} tokens, {s['eval_windows']} non-overlapping windows of "
        f"{s['eval_seq']} from the start of the second half of the file (disjoint). Every linear of "
        "the 30 blocks is pruned (lm_head and embeddings are not). Bytes: every stored value in "
        "bfloat16 (2 B), index metadata at its own width, tied embeddings once.",
        "",
        "| row | perplexity | / dense | llm-compressor 0.14 (issue 14) | stored MB | / dense bytes | "
        "output err (mean) | mask-only err | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = f"{r['ppl'] / dense['ppl']:.2f}" if dense else "–"
        bytes_ratio = f"{r['stored_bytes'] / dense['stored_bytes']:.3f}" if dense else "–"
        lines.append(
            f"| {r['label']} | {r['ppl']:.2f} | {ratio} | {PEER.get(r['label'], '–')} | "
            f"{r['stored_bytes'] / 1e6:.1f} | {bytes_ratio} | {cell(r.get('output_error'))} | "
            f"{cell(r.get('output_error_mask_only'))} | {r['seconds']:.0f} |"
        )
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def frontier_rows(result: dict) -> list[dict]:
    """The schema benchmarks/frontier.py reads."""
    calib = f"{result['sizes']['calib_windows']}x{result['sizes']['calib_seq']}"
    # every window's first token has no prediction: scored = tokens - windows
    predicted = result["eval_tokens"] - result["eval_tokens"] // result["sizes"]["eval_seq"]
    return [
        {
            "label": r["label"],
            # one marker per method on the plot: prune rows are told apart by their score
            "method": r["fields"].get("score", r["method"]) if r["method"] == "prune" else r["method"],
            "heal": r.get("heal", False),  # False, or the heal budget (a dict)
            "stored_bytes": r["stored_bytes"],
            "ppl": r["ppl"],
            "eval_tokens": predicted,  # tokens scored, as frontier.py counts them
            "calib": calib,
        }
        for r in result["rows"]
        if r["method"] != "llm-compressor"  # the peer's in-memory model stores no packed bytes
    ]


def write(out: Path, result: dict) -> None:
    """This run's report, then frontier_sparse.json from every sparse_p1*.json of the same sizes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['benchmark']}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{result['benchmark']}.md").write_text(render(result))
    rows: dict[str, dict] = {}
    for path in sorted(out.glob("sparse_p1*.json")):
        part = json.loads(path.read_text())
        if part.get("sizes") == result["sizes"]:
            rows.update((r["label"], r) for r in frontier_rows(part))  # one row per label
    (out / "frontier_sparse.json").write_text(json.dumps(list(rows.values()), indent=2))


def previous_rows(out: Path, name: str, sizes: dict) -> list[dict]:
    path = out / f"{name}.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return old["rows"] if old.get("sizes") == sizes else []


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = Path(args.smollm2)
    if not gguf.exists():
        sys.exit(f"error: SmolLM2 GGUF `{gguf}` not found; pass --smollm2 PATH")
    source = str(Path(args.data_dir) / "wikitext-2" / "wiki.test.raw")
    sizes = {k: getattr(args, k) for k in ("calib_windows", "calib_seq", "eval_windows", "eval_seq")}
    loaded = load_model(str(gguf))
    calib = start_windows(loaded.tokenizer, source, args.calib_windows, args.calib_seq)
    ctx = FixedCalibration(calib, tokenizer=loaded.tokenizer, quiet=True)
    eval_windows = ctx.windows(
        source, split="eval", seq_len=args.eval_seq, num_windows=args.eval_windows
    )
    out = Path(args.out)
    name = f"sparse_p1_{args.tag}" if args.tag else "sparse_p1"
    result = {
        "benchmark": name,
        "env": collect_env(torch.device("cpu"), 0),
        "model": gguf.name or str(gguf),
        "sizes": sizes,
        "eval_tokens": int(eval_windows.numel()),
        "peer": PEER,
        "rows": previous_rows(out, name, sizes) if args.resume else [],
    }
    wanted = set(args.rows.split(",")) if args.rows else None
    for label, method, fields in ROWS:
        plain, healed = rows_to_run(result, wanted, label, method, args)
        if not (plain or healed):
            continue
        row, model = run_row(loaded.model, ctx, label, method, fields, source, sizes, eval_windows)
        if plain:
            result["rows"].append(row)
            write(out, result)
        if healed:
            result["rows"].append(heal_row(model, loaded.model, ctx, row, source, eval_windows, args))
            write(out, result)
        del model
    if (wanted is None or PEER_ROW in wanted) and not any(r["label"] == PEER_ROW for r in result["rows"]):
        row = llmcompressor_row(loaded.model, loaded.tokenizer, calib, eval_windows)
        if row is not None:
            result["rows"].append(row)
            write(out, result)
    if wanted is None or DS_INIT in wanted or any(w.startswith("dsformer-stf") for w in wanted):
        dsformer_rows(loaded.model, ctx, source, sizes, eval_windows, args, result, out)


def rows_to_run(result: dict, wanted: set | None, label: str, method, args) -> tuple[bool, bool]:
    """(run the plain row, run its +heal row): asked for (or everything) and not done yet."""
    done = {r["label"] for r in result["rows"]}
    plain = (wanted is None or label in wanted) and label not in done
    healed = (
        method is not None
        and args.heal_steps > 0
        and (wanted is None or f"{label}+heal" in wanted)
        and f"{label}+heal" not in done
    )
    return plain, healed


# ---------------------------------------------------------------- llm-compressor on the same text

PEER_ROW = "llm-compressor-sparsegpt-2:4"


def llmcompressor_row(dense, tokenizer, calib: torch.Tensor, eval_windows: torch.Tensor) -> dict | None:
    """llm-compressor's SparseGPTModifier 2:4 (its defaults: block 128, dampening 0.01) on the
    same calibration windows, lm_head ignored as in our rows; None when it is not installed."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.obcq import SparseGPTModifier
    except ImportError as err:
        log(f"llm-compressor not importable ({err}); its row is skipped")
        return None
    model = copy.deepcopy(dense)
    data = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as plain:
        # oneshot re-reads the config from name_or_path: point it at the plain (dequantized) one
        model.config.save_pretrained(plain)
        model.config._name_or_path = plain
        oneshot(
            model=model,
            dataset=data,
            processor=tokenizer,  # the windows are already tokens; oneshot still asks for one
            recipe=recipe,
            num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1],
        )
    seconds = time.perf_counter() - started
    value = float(perplexity(model, eval_windows, batch_size=4)["perplexity"])
    import llmcompressor

    log(f"{PEER_ROW:20s} ppl {value:10.3f}  {seconds:.0f}s")
    return {
        "label": PEER_ROW,
        "method": "llm-compressor",
        "fields": {"version": llmcompressor.__version__, "mask_structure": "2:4"},
        "ppl": value,
        "stored_bytes": stored_bytes(model),  # zeros stored densely by this in-memory model
        "seconds": round(seconds, 1),
        "sparsity": _linear_sparsity(model),
    }


def _linear_sparsity(model: torch.nn.Module) -> float:
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 4)


# ---------------------------------------------------------------- dsformer at the bytes of 2:4

DS_INIT = "dsformer-init"


def two_four_rank(model: torch.nn.Module) -> float:
    """dsformer's `rank` (a keep ratio in the fp32 model's bytes) at which no layer stores more
    bfloat16 bytes than its 2:4 packing (values + 2-bit positions): the budget of the frontier."""
    from compressor.methods._dsformer_factor import SparsePattern, dense_sparse_bytes, solve_inner_dim
    from compressor.methods.prune import nm_sparse_bytes
    from compressor.targeting import linear_shape, select_linears

    pattern, ranks = SparsePattern(2, 4), []
    for module in select_linears(model, (), ()).values():
        out_f, in_f = linear_shape(module)
        two_four = nm_sparse_bytes(out_f, in_f, 2, 4, 2)["total_bytes"] / (2 * out_f * in_f)
        k = solve_inner_dim(out_f, in_f, two_four, pattern, 2)
        fp32 = dense_sparse_bytes(out_f, in_f, k, pattern, 4)["total_bytes"]
        ranks.append(fp32 / (4 * out_f * in_f))
    return min(ranks) * (1 + 1e-9)  # the ratio itself must pass solve_inner_dim's <= test


def dsformer_rows(dense, ctx, source, sizes, eval_windows, args, result, out) -> None:
    """dsformer at the bytes of 2:4: its initialisation, then STF continued from it."""
    from compressor.methods._dsformer_stf import train_stf
    from compressor.methods.dsformer import pack_trained, unpack_for_training

    rank = two_four_rank(dense)
    fields = {
        "keep_bytes": rank,
        "coding": args.ds_coding,
        "init_iters": args.ds_init_iters,
        "stf_steps": 0,
        "eval_windows": 0,
    }
    model = copy.deepcopy(dense)
    if not any(r["label"] == DS_INIT for r in result["rows"]):
        result["rows"].append(
            run_row(model, ctx, DS_INIT, "dsformer", fields, source, sizes, eval_windows, copy_model=False)[0]
        )
        write(out, result)
    else:  # resumed: rebuild the initialisation the STF continues from
        run_row(model, ctx, DS_INIT, "dsformer", fields, source, sizes, eval_windows, copy_model=False)
    started = time.perf_counter()
    unpack_for_training(model)
    windows = ctx.windows(
        source, split="train", seq_len=sizes["calib_seq"],
        num_windows=args.ds_stf_steps * args.ds_stf_batch,
    )  # fmt: skip
    curves = train_stf(
        model, windows, ctx, steps=args.ds_stf_steps, lr=args.ds_lr, batch_size=args.ds_stf_batch
    )
    pack_trained(model)
    seconds = time.perf_counter() - started
    label = f"dsformer-stf{args.ds_stf_steps}"
    value = float(perplexity(model, eval_windows, batch_size=4)["perplexity"])
    row = {
        "label": label,
        "method": "dsformer",
        "fields": {**fields, "stf_steps": args.ds_stf_steps, "lr": args.ds_lr,
                   "stf_batch": args.ds_stf_batch, "stf_seq": sizes["calib_seq"]},
        "ppl": value,
        "stored_bytes": stored_bytes(model),
        "seconds": round(seconds, 1),
        "stf_loss_first": curves["stf_loss"][0],
        "stf_loss_last5": sum(curves["stf_loss"][-5:]) / len(curves["stf_loss"][-5:]),
        "stf_support_moved": curves["stf_support_change"][-1],
    }  # fmt: skip
    log(f"{label:20s} ppl {value:10.3f}  bytes {row['stored_bytes']:,}  {seconds:.0f}s")
    done = {r["label"] for r in result["rows"]}
    if label not in done:
        result["rows"].append(row)
        write(out, result)
    wanted = set(args.rows.split(",")) if args.rows else None
    if rows_to_run(result, wanted, label, "dsformer", args)[1]:
        result["rows"].append(heal_row(model, dense, ctx, row, source, eval_windows, args))
        write(out, result)


if __name__ == "__main__":
    main()

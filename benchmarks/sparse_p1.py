"""P1 (BENCHMARKS.md): 2:4 and 50 % pruning of SmolLM2-135M, and dsformer at the bytes of 2:4.

The llm-compressor comparison of issue 14, on its protocol (in the report's text: calibration on the first
tokens of wiki.test.raw in order, perplexity on the second half). Every row compresses a fresh copy of the dense
model; unstructured pruning stores its zeros densely (it saves no bytes). `--heal-steps N` adds `<label>+heal`
rows: benchmarks/frontier.py's heal of that row's model, same budget flags.
"""

import json
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

from dense_sparse import measure, stf
from frontier import heal_row, sizes_and_heal_arguments
from harness import (Report, arguments, environment, eval_windows, fmt, load, log, need_file, numbers, provenance,
                     rerender, sizes_of, stored_bytes, table, wiki, write_text)

# llm-compressor 0.14 on the same model and protocol (issue 14's table; held-out split of its own).
PEER = {"dense": 26.8, "wanda-2:4": 155.0, "sparsegpt-2:4": 78.5}
# (label, method, config fields beyond calibration): run in this order; each but dense can be healed.
ROWS = [("dense", "dense", {}),
        *[(f"{s}-2:4", "prune", {"score": s, "pattern": "2:4"}) for s in ("sparsegpt", "wanda", "magnitude")],
        *[(f"{s}-50%", "prune", {"score": s, "pattern": "unstructured", "sparsity": 0.5})
          for s in ("sparsegpt", "wanda")]]
METRIC_KEYS = ("sparsity", "output_error", "output_error_mask_only", "keep_ratio_bytes", "mean_fit_error")
PEER_ROW, DS_INIT = "llm-compressor-sparsegpt-2:4", "dsformer-init"


def fixed_calibration(calib, **kwargs):
    """A Context whose calibration windows are `calib` (the start of the text, as the peer run used), not a subset."""
    from compressor.context import Context

    class FixedCalibration(Context):
        def windows(self, source="default", *, split="calib", **kw):
            return calib if split == "calib" else super().windows(source, split=split, **kw)

    return FixedCalibration(**kwargs)


def rows(a, dense) -> list:
    """Every row (label, method, fields, start) in run order, each pruned or STF row followed by its `+heal` row."""
    ds = {"keep_bytes": two_four_rank(dense), "coding": "sparsegpt", "init_iters": a.ds_init_iters, "stf_steps": 0,
          "eval_windows": 0}
    stf_row = (f"dsformer-stf{a.ds_stf_steps}", "stf", {**ds, "stf_steps": a.ds_stf_steps, "lr": a.ds_lr,
                                                        "stf_batch": a.ds_stf_batch, "stf_seq": a.calib_seq}, DS_INIT)
    peer = [(PEER_ROW, "llm-compressor", {"peer": "llmcompressor"}, None)] if find_spec("llmcompressor") else []
    if not peer and (a.rows is None or PEER_ROW in a.rows.split(",")):
        log("llm-compressor is not installed; its row is skipped")
    heal = {"heal": [a.heal_steps, a.heal_batch, a.heal_seq, a.heal_lr, a.heal_loss, a.heal_lora_r]}
    out = []
    for label, method, fields, *start in [*ROWS, *peer, (DS_INIT, "dsformer", ds, None), stf_row]:
        out.append((label, method, fields, start[0] if start else None))
        if a.heal_steps > 0 and method in ("prune", "stf"):
            out.append((f"{label}+heal", "heal", heal, label))
    return out


def main(argv=None) -> None:
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    sizes_and_heal_arguments(p, heal_steps=0)
    numbers(p, (("ds-stf-steps", 100), ("ds-stf-batch", 1), ("ds-init-iters", 2), ("ds-lr", 1e-4)))
    p.add_argument("--tag", default="", help="report name suffix: sparse_p1_<tag>.{json,md}")
    args = p.parse_args(argv)
    name = f"sparse_p1_{args.tag}" if args.tag else "sparse_p1"
    if args.render:
        return print(rerender(Path(args.out), name, render))
    need_file(args.smollm2, "--smollm2 PATH")
    import torch

    from compressor.evaluation import perplexity

    torch.set_num_threads(args.threads)
    (loaded, plain), source, sizes = load(args.smollm2), wiki(args.data_dir), sizes_of(args)
    stream = plain.windows(source, split="calib", seq_len=args.calib_seq)
    if stream.shape[0] < args.calib_windows:
        sys.exit(f"error: the calibration half holds only {stream.shape[0]} windows of {args.calib_seq}")
    calib = stream[:args.calib_windows]
    ctx = fixed_calibration(calib, tokenizer=loaded.tokenizer, quiet=True)
    windows = eval_windows(ctx, source, args.eval_seq, args.eval_windows)
    report = SparseReport(args.out, name, render)
    report.begin(sizes, benchmark=name, env=environment(), model=Path(args.smollm2).name,
                 eval_tokens=int(windows.numel()), peer=PEER)

    def result(state: dict, method: str, fields: dict, model, stage, base) -> dict:
        value = float(perplexity(model, windows, batch_size=4)["perplexity"])
        row = {"method": "dsformer" if method == "stf" else method, "fields": fields, "ppl": value,
               "stored_bytes": stored_bytes(model)}
        if method == "heal":  # the healed row keeps its start's method, fields and metrics
            return {**base, **stage, **row, "method": base["method"], "fields": base["fields"],
                    "ppl_before_heal": base["ppl"]}
        if method == "stf":
            loss = stage["stf_loss"]
            return {**row, "stf_loss_first": loss[0], "stf_loss_last5": sum(loss[-5:]) / len(loss[-5:]),
                    "stf_support_moved": stage["stf_support_change"][-1]}
        metrics = getattr(stage, "metrics", stage or {})  # llm-compressor's stage: its fields and sparsity
        return {**row, **{k: metrics[k] for k in (*METRIC_KEYS, "fields") if k in metrics}}

    special = {"dense": lambda model, fields, ctx: None,
               "heal": lambda model, fields, ctx: heal_row(model, loaded.model, source, args, ctx, windows),
               "stf": lambda m, f, ctx: stf(m, ctx, source, f["stf_seq"], f["stf_steps"], f["lr"], f["stf_batch"]),
               "llm-compressor": lambda model, fields, ctx: llmcompressor(model, calib, loaded.tokenizer)}
    measure(report, rows(args, loaded.model), loaded.model, ctx, result, args.force,
            only=set(args.rows.split(",")) if args.rows else None, special=special,
            calib={"calibration": source, "num_windows": args.calib_windows, "seq_len": args.calib_seq})


class SparseReport(Report):
    """sparse_p1's report: every row added also rewrites reports/frontier_sparse.json."""

    def write(self) -> None:
        super().write()
        write_frontier_rows(self.out, self.state["sizes"])


def llmcompressor(model, calib, tokenizer) -> dict:
    """llm-compressor's SparseGPTModifier 2:4 (its defaults: block 128, dampening 0.01) on the same
    calibration windows, lm_head ignored as in our rows: its fields and the sparsity reached."""
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier

    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    with tempfile.TemporaryDirectory() as plain:
        model.config.save_pretrained(plain)  # oneshot re-reads the config from name_or_path
        model.config._name_or_path = plain
        oneshot(model=model, dataset=data, processor=tokenizer, num_calibration_samples=calib.shape[0],
                recipe=SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]),
                max_seq_length=calib.shape[1])
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    sparsity = round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 4)
    return {"fields": {"version": llmcompressor.__version__, "mask_structure": "2:4"}, "sparsity": sparsity}


def two_four_rank(model) -> float:
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
        ranks.append(dense_sparse_bytes(out_f, in_f, k, pattern, 4)["total_bytes"] / (4 * out_f * in_f))
    return min(ranks) * (1 + 1e-9)  # the ratio itself must pass solve_inner_dim's <= test


def render(result: dict) -> str:
    s, dense = result["sizes"], next((r for r in result["rows"] if r["label"] == "dense"), None)
    rows = [[r["label"], f"{r['ppl']:.2f}", f"{r['ppl'] / dense['ppl']:.2f}" if dense else "–",
             PEER.get(r["label"], "–"), f"{r['stored_bytes'] / 1e6:.1f}",
             f"{r['stored_bytes'] / dense['stored_bytes']:.3f}" if dense else "–", fmt(r.get("output_error"), 4),
             fmt(r.get("output_error_mask_only"), 4), f"{r['seconds']:.0f}"] for r in result["rows"]]
    return "\n".join([
        "# P1: pruning SmolLM2-135M (2:4 and 50 % unstructured), WikiText-2", "", provenance(result["env"]), "",
        f"Model: {result['model']} loaded as a plain HF LlamaForCausalLM in float32. Calibration: the first "
        f"{s['calib_windows']} x {s['calib_seq']} tokens of wiki.test.raw. Evaluation: {result['eval_tokens']} tokens, "
        f"{s['eval_windows']} non-overlapping windows of {s['eval_seq']} from the start of the second half of the file "
        "(disjoint). Every linear of the 30 blocks is pruned (lm_head and embeddings are not). Bytes: every stored "
        "value in bfloat16 (2 B), index metadata at its own width, tied embeddings once.", "",
        *table(["row", "perplexity", "/ dense", "llm-compressor 0.14 (issue 14)", "stored MB", "/ dense bytes",
                "output err (mean)", "mask-only err", "seconds"], rows), "", *result.get("notes", [])]) + "\n"


def write_frontier_rows(out: Path, sizes: dict) -> None:
    """reports/frontier_sparse.json (benchmarks/frontier.py's schema) from every sparse_p1*.json of
    these sizes; the peer's in-memory model stores no packed bytes and is left out."""
    rows: dict[str, dict] = {}
    for part in [json.loads(path.read_text()) for path in sorted(out.glob("sparse_p1*.json"))]:
        scored = part.get("eval_tokens", 0) // sizes["eval_seq"] * (sizes["eval_seq"] - 1)  # a window's first: unscored
        for r in [r for r in part["rows"] if part.get("sizes") == sizes and r["method"] != "llm-compressor"]:
            method = r["fields"].get("score", r["method"]) if r["method"] == "prune" else r["method"]  # prune: by score
            rows[r["label"]] = {"label": r["label"], "method": method, "heal": r.get("heal", False),
                                "stored_bytes": r["stored_bytes"], "ppl": r["ppl"], "eval_tokens": scored,
                                "calib": f"{sizes['calib_windows']}x{sizes['calib_seq']}"}
    write_text(out / "frontier_sparse.json", json.dumps(list(rows.values()), indent=2))


if __name__ == "__main__":
    main()

"""P1 (BENCHMARKS.md): 2:4 and 50 % pruning of SmolLM2-135M, and dsformer at the bytes of 2:4.

Protocol (the llm-compressor comparison of issue 14): a plain HF copy of the model in float32;
calibration = the first 32 x 256 tokens of wiki.test.raw (in order); perplexity on
non-overlapping windows of the second half of the same file. Every row compresses a fresh copy of
the dense model. Stored bytes: every value in bfloat16, index metadata at its own width, tied
embeddings once (unstructured pruning stores its zeros densely: it saves no bytes).

Writes reports/sparse_p1[_TAG].{json,md} and reports/frontier_sparse.json (benchmarks/frontier.py's
rows) after every row.

Example:  nice -n 5 nohup python benchmarks/sparse_p1.py > /tmp/sparse-bench.log 2>&1 &
          python benchmarks/sparse_p1.py --rows dense,sparsegpt-2:4 --eval-windows 4   (quick look)
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

from frontier import heal_row, sizes_and_heal_arguments
from harness import (Report, apply_method, arguments, environment, eval_windows, finite, log, need_file, numbers,
                     rerender, sizes_of, stored_bytes, table, wiki, write_text)

# llm-compressor 0.14 on the same model and protocol (issue 14's table; held-out split of its own).
PEER = {"dense": 26.8, "wanda-2:4": 155.0, "sparsegpt-2:4": 78.5}
# (label, method, config fields beyond calibration): run in this order.
ROWS = [("dense", None, {}),
        ("sparsegpt-2:4", "prune", {"score": "sparsegpt", "pattern": "2:4"}),
        ("wanda-2:4", "prune", {"score": "wanda", "pattern": "2:4"}),
        ("magnitude-2:4", "prune", {"score": "magnitude", "pattern": "2:4"}),
        ("sparsegpt-50%", "prune", {"score": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5}),
        ("wanda-50%", "prune", {"score": "wanda", "pattern": "unstructured", "sparsity": 0.5})]
METRIC_KEYS = ("sparsity", "output_error", "output_error_mask_only", "keep_ratio_bytes", "mean_fit_error")
PEER_ROW, DS_INIT = "llm-compressor-sparsegpt-2:4", "dsformer-init"


def parse_args(argv=None):
    p = arguments(__doc__, smollm2=True, data=True, rows=True)
    sizes_and_heal_arguments(p, heal_steps=0)  # --heal-steps N adds the rows `<label>+heal`
    numbers(p, (("ds-stf-steps", 100), ("ds-stf-batch", 1), ("ds-init-iters", 2)))
    p.add_argument("--ds-lr", type=float, default=1e-4, help="dsformer STF learning rate")
    p.add_argument("--ds-coding", default="sparsegpt", help="dsformer sparse coding rule")
    p.add_argument("--tag", default="", help="report name suffix: sparse_p1_<tag>.{json,md}")
    return p.parse_args(argv)


def fixed_calibration(calib, **kwargs):
    """A Context whose calibration windows are `calib` (the start of the text, as the peer run
    used) instead of compressor.data's seeded random subset of the calibration half."""
    from compressor.context import Context

    class FixedCalibration(Context):
        def windows(self, source="default", *, split="calib", **kw):
            return calib if split == "calib" else super().windows(source, split=split, **kw)

    return FixedCalibration(**kwargs)


class Run:
    """The dense model, the protocol's windows and the report of one invocation."""

    def __init__(self, args) -> None:
        from compressor.data import windows_for
        from compressor.models import load_model

        self.args, self.source, self.sizes = args, wiki(args.data_dir), sizes_of(args)
        loaded = load_model(args.smollm2)
        self.dense, self.tokenizer = loaded.model, loaded.tokenizer
        stream = windows_for(self.tokenizer, self.source, split="calib", seq_len=args.calib_seq)
        if stream.shape[0] < args.calib_windows:
            sys.exit(f"error: the calibration half holds only {stream.shape[0]} windows of {args.calib_seq}")
        self.calib = stream[:args.calib_windows]
        self.ctx = fixed_calibration(self.calib, tokenizer=self.tokenizer, quiet=True)
        self.windows = eval_windows(self.ctx, self.source, args.eval_seq, args.eval_windows)
        name = f"sparse_p1_{args.tag}" if args.tag else "sparse_p1"
        self.report = Report(args.out, name, render)
        self.report.begin(self.sizes, benchmark=name, env=environment(), model=Path(args.smollm2).name,
                          eval_tokens=int(self.windows.numel()), peer=PEER)
        self.wanted = set(args.rows.split(",")) if args.rows else None

    def todo(self, label: str, config: dict) -> bool:
        asked = self.wanted is None or label in self.wanted
        return asked and self.report.cached(label, {**self.sizes, **config}, self.args.force) is None

    def add(self, label: str, config: dict, row: dict) -> None:
        self.report.add(label, {**self.sizes, **config}, row)
        write_frontier_rows(Path(self.args.out), self.sizes)

    def measure(self, label: str, model, method, fields: dict, seconds: float, metrics: dict) -> dict:
        from compressor.evaluation import perplexity

        value = finite(label, float(perplexity(model, self.windows, batch_size=4)["perplexity"]))
        log(f"{label:20s} ppl {value:10.3f}  bytes {stored_bytes(model):,}  {seconds:.0f}s")
        return {"method": method or "dense", "fields": fields, "ppl": value, "stored_bytes": stored_bytes(model),
                "seconds": round(seconds, 1), **{k: metrics[k] for k in METRIC_KEYS if k in metrics}}

    def compress(self, label: str, method, fields: dict, model=None) -> tuple[dict, object]:
        """Compress a copy of the dense model (or `model`) with one configuration; (row, model)."""
        model = copy.deepcopy(self.dense) if model is None else model
        metrics, seconds = {}, 0.0
        if method is not None:
            calib = {"calibration": self.source, "num_windows": self.args.calib_windows,
                     "seq_len": self.args.calib_seq}
            stage, _, seconds = apply_method(model, method, {**calib, **fields}, self.ctx)
            metrics = stage.metrics
        return self.measure(label, model, method, fields, seconds, metrics), model

    def heal_todo(self, label: str) -> dict | None:
        """The heal row's config when `<label>+heal` is to be run (--heal-steps > 0, not cached)."""
        a = self.args
        config = {"heal": [a.heal_steps, a.heal_batch, a.heal_seq, a.heal_lr, a.heal_loss, a.heal_lora_r]}
        return config if a.heal_steps > 0 and self.todo(f"{label}+heal", config) else None

    def heal(self, label: str, model, base: dict) -> None:
        """`<label>+heal`: benchmarks/frontier.py's heal of the compressed model, same budget flags."""
        a, config = self.args, self.heal_todo(label)
        if config is None:
            return
        info = heal_row(model, self.dense, self.source, a, self.ctx, self.windows)
        row = self.measure(f"{label}+heal", model, base["method"], base["fields"], info["heal_seconds"], {})
        self.add(f"{label}+heal", config, {**base, **info, **row, "ppl_before_heal": base["ppl"]})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        print(rerender(Path(args.out), f"sparse_p1_{args.tag}" if args.tag else "sparse_p1", render))
        return
    need_file(args.smollm2, "--smollm2 PATH")
    import torch

    torch.set_num_threads(args.threads)
    run = Run(args)
    for label, method, fields in ROWS:
        if not (run.todo(label, fields) or method is not None and run.heal_todo(label)):
            continue
        row, model = run.compress(label, method, fields)
        if run.todo(label, fields):
            run.add(label, fields, row)
        if method is not None:
            run.heal(label, model, row)
    if run.todo(PEER_ROW, {"peer": "llmcompressor"}):
        llmcompressor_row(run)
    if args.rows is None or DS_INIT in run.wanted or any(w.startswith("dsformer-stf") for w in run.wanted):
        dsformer_rows(run)


# ---------------------------------------------------------------- llm-compressor on the same text


def llmcompressor_row(run: Run) -> None:
    """llm-compressor's SparseGPTModifier 2:4 (its defaults: block 128, dampening 0.01) on the
    same calibration windows, lm_head ignored as in our rows; skipped when it is not installed."""
    import torch

    try:
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.obcq import SparseGPTModifier
    except ImportError as err:
        return log(f"llm-compressor not importable ({err}); its row is skipped")
    model, calib = copy.deepcopy(run.dense), run.calib
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as plain:
        model.config.save_pretrained(plain)  # oneshot re-reads the config from name_or_path
        model.config._name_or_path = plain
        oneshot(model=model, dataset=data, processor=run.tokenizer, num_calibration_samples=calib.shape[0],
                recipe=SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]),
                max_seq_length=calib.shape[1])
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    sparsity = round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 4)
    fields = {"version": llmcompressor.__version__, "mask_structure": "2:4"}
    row = run.measure(PEER_ROW, model, "llm-compressor", fields, time.perf_counter() - started, {})
    run.add(PEER_ROW, {"peer": "llmcompressor"}, {**row, "sparsity": sparsity})


# ---------------------------------------------------------------- dsformer at the bytes of 2:4


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


def dsformer_rows(run: Run) -> None:
    """dsformer at the bytes of 2:4: its initialisation, then STF continued from it (+ heal)."""
    from compressor.methods._dsformer_stf import train_stf
    from compressor.methods.dsformer import pack_trained, unpack_for_training

    a = run.args
    fields = {"keep_bytes": two_four_rank(run.dense), "coding": a.ds_coding, "init_iters": a.ds_init_iters,
              "stf_steps": 0, "eval_windows": 0}
    label = f"dsformer-stf{a.ds_stf_steps}"
    stf = {**fields, "stf_steps": a.ds_stf_steps, "lr": a.ds_lr, "stf_batch": a.ds_stf_batch, "stf_seq": a.calib_seq}
    if not (run.todo(DS_INIT, fields) or run.todo(label, stf) or run.heal_todo(label)):
        return
    model = copy.deepcopy(run.dense)
    row, _ = run.compress(DS_INIT, "dsformer", fields, model)  # the init the STF continues from
    if run.todo(DS_INIT, fields):
        run.add(DS_INIT, fields, row)
    started = time.perf_counter()
    unpack_for_training(model)
    windows = run.ctx.windows(run.source, split="train", seq_len=a.calib_seq,
                              num_windows=a.ds_stf_steps * a.ds_stf_batch)
    curves = train_stf(model, windows, run.ctx, steps=a.ds_stf_steps, lr=a.ds_lr, batch_size=a.ds_stf_batch)
    pack_trained(model)
    loss = curves["stf_loss"]
    row = {**run.measure(label, model, "dsformer", stf, time.perf_counter() - started, {}),
           "stf_loss_first": loss[0], "stf_loss_last5": sum(loss[-5:]) / len(loss[-5:]),
           "stf_support_moved": curves["stf_support_change"][-1]}
    if run.todo(label, stf):
        run.add(label, stf, row)
    run.heal(label, model, row)


# ---------------------------------------------------------------- report


def render(result: dict) -> str:
    s, dense = result["sizes"], next((r for r in result["rows"] if r["label"] == "dense"), None)
    cell = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [[r["label"], f"{r['ppl']:.2f}", f"{r['ppl'] / dense['ppl']:.2f}" if dense else "–",
             PEER.get(r["label"], "–"), f"{r['stored_bytes'] / 1e6:.1f}",
             f"{r['stored_bytes'] / dense['stored_bytes']:.3f}" if dense else "–", cell(r.get("output_error")),
             cell(r.get("output_error_mask_only")), f"{r['seconds']:.0f}"] for r in result["rows"]]
    env = result["env"]
    return "\n".join([
        "# P1: pruning SmolLM2-135M (2:4 and 50 % unstructured), WikiText-2", "",
        f"Run {env['date']} on {env['host']} ({env['device_name']}), git {env['git_sha']}, "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}.", "",
        f"Model: {result['model']} loaded as a plain HF LlamaForCausalLM in float32. Calibration: the "
        f"first {s['calib_windows']} x {s['calib_seq']} tokens of wiki.test.raw. Evaluation: "
        f"{result['eval_tokens']} tokens, {s['eval_windows']} non-overlapping windows of "
        f"{s['eval_seq']} from the start of the second half of the file (disjoint). Every linear of "
        "the 30 blocks is pruned (lm_head and embeddings are not). Bytes: every stored value in "
        "bfloat16 (2 B), index metadata at its own width, tied embeddings once.", "",
        *table(["row", "perplexity", "/ dense", "llm-compressor 0.14 (issue 14)", "stored MB", "/ dense bytes",
                "output err (mean)", "mask-only err", "seconds"], rows), "", *result.get("notes", [])]) + "\n"


def write_frontier_rows(out: Path, sizes: dict) -> None:
    """reports/frontier_sparse.json (benchmarks/frontier.py's schema) from every sparse_p1*.json of
    these sizes; the peer's in-memory model stores no packed bytes and is left out."""
    rows: dict[str, dict] = {}
    for path in sorted(out.glob("sparse_p1*.json")):
        part = json.loads(path.read_text())
        if part.get("sizes") != sizes:
            continue
        seq = part["sizes"]["eval_seq"]  # every window's first token has no prediction
        for r in part["rows"]:
            if r["method"] != "llm-compressor":  # prune rows are told apart by their score
                method = r["fields"].get("score", r["method"]) if r["method"] == "prune" else r["method"]
                rows[r["label"]] = {"label": r["label"], "method": method, "heal": r.get("heal", False),
                                    "stored_bytes": r["stored_bytes"], "ppl": r["ppl"],
                                    "eval_tokens": part["eval_tokens"] - part["eval_tokens"] // seq,
                                    "calib": f"{sizes['calib_windows']}x{sizes['calib_seq']}"}
    write_text(out / "frontier_sparse.json", json.dumps(list(rows.values()), indent=2))


if __name__ == "__main__":
    main()

"""P3 decode speed: greedy decoding of SmolLM2-135M, dense vs compressed, one process (BENCHMARKS.md).

    nice -n 5 python benchmarks/decode_speed.py                       # CPU, the real GGUF model
    python benchmarks/decode_speed.py --device cuda --random-init benchmarks/smollm2_135m_config.json
    python benchmarks/decode_speed.py --render [--tag quant]          # the .md again from the .json

Variants: `dense`; saes-svd at keep 0.6 / 0.8 (`lowrank-0.6`, `lowrank-0.8`); `prune-2:4` (Wanda 2:4,
stored packed, unpacked on every call on CPU) and `prune-2:4-cached` (the same model inside
`compressor.kernels.dispatch.cached_unpack()`; CPU only); symmetric RTN in groups of 64 of every
linear: `int8`, `int4`, `lowrank-0.6+int4` (both factors quantized), decoded through
`compressor.kernels.dispatch.quant_linear`. Every variant decodes the same prompts with
`model.generate(do_sample=False)`, exactly `--new-tokens` tokens, at each batch size; variants are
interleaved inside every repeat (the order rotates) so load noise spreads over all of them. Decode
tokens/s = batch * (new_tokens - 1) / time from the first generated token to the last (prefill
excluded); end-to-end tokens/s beside it. Medians over repeats, ratios to the dense median.

Memory: each variant is loaded in a FRESH subprocess (`compressor.load`) that reports VmRSS / VmHWM
after loading and VmRSS after a short decode, minus its own reading after imports (see the notes).
Real model: the GGUF is dequantized once into a float HF folder, compressed once with 16 x 256
tokens of WikiText-2 into `--cache-dir` and reused. `--random-init CONFIG_JSON`: the same shapes
with random weights (plain SVD, magnitude 2:4) for machines the GGUF cannot reach; memory there is
tensor bytes. dtype float32 on CPU (`--dtype`), bfloat16 on CUDA; `--threads` default 1 on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from compressor.memory import proc_status_mb
from harness import (Report, apply_method, arguments, calib_fields, environment, fmt, log, numbers, rerender,
                     run_worker, table, wiki)

VARIANTS = ("dense", "lowrank-0.6", "lowrank-0.8", "prune-2:4", "prune-2:4-cached", "int8", "int4",
            "lowrank-0.6+int4")
KNOWN = (*VARIANTS, "int8-emb", "int4-emb")  # -emb: named only (`--variants`), not in the default run
QUANT_BITS = {"int8": 8, "int4": 4}  # weight-only quantization: bits by variant suffix
EMBEDDING = "-emb"  # "int8-emb": the tied embedding / lm_head quantized too (rtn `embedding_bits`)
QUANT_GROUP = 64  # one group size for every quantized matrix
CACHED_UNPACK = {"prune-2:4-cached": "prune-2:4"}  # runs the other variant's model inside cached_unpack()


def parse_args(argv=None) -> argparse.Namespace:
    p = arguments(__doc__, smollm2=True, data=True, threads=None)
    p.add_argument("--random-init", metavar="CONFIG_JSON", help="random weights from this config.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batches", default="1,8")
    numbers(p, (("new-tokens", 128), ("prompt-tokens", 32), ("repeats", 5), ("calib-windows", 16),
                ("calib-seq", 256), ("seed", 0)))
    p.add_argument("--cache-dir", default="/tmp/compressor-decode-cache")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    p.add_argument("--tag", default="", help="report names become decode_speed_<tag>.*")
    p.add_argument("--memory-only", action="store_true", help="re-measure the memory columns of a report")
    p.add_argument("--memory-worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_dtype(args) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def keep_of(variant: str) -> float:
    return float(variant.split("-")[1].split("+")[0])


def split_variant(variant: str) -> tuple[str, int | None]:
    """("lowrank-0.6", 4) for "lowrank-0.6+int4"; ("dense", 8) for "int8"; (variant, None) else."""
    base, _, quant = variant.removesuffix(EMBEDDING).partition("+")
    if base in QUANT_BITS:
        return "dense", QUANT_BITS[base]
    return base, QUANT_BITS.get(quant)


# ---------------------------------------------------------------- the real model: a cache of folders


def build_cache(args, variants: list[str]) -> dict[str, Path]:
    """Write (once) a dense float32 HF folder and one compressed checkpoint per variant."""
    cache = Path(args.cache_dir)
    folders = {"dense": cache / "dense"}
    if not (folders["dense"] / "config.json").is_file():
        log(f"dequantizing {args.smollm2} -> {folders['dense']}")
        from compressor.models import load_model, save_checkpoint

        loaded = load_model(args.smollm2, dtype="float32")
        save_checkpoint(loaded.model, loaded.tokenizer, folders["dense"])
    for variant in variants:
        if variant == "dense" or variant in CACHED_UNPACK:
            continue
        folders[variant] = cache / f"{variant.replace(':', '')}-c{args.calib_windows}x{args.calib_seq}"
        if not (folders[variant] / "config.json").is_file():
            compress_into(args, folders["dense"], folders[variant], variant)
    for variant, base in CACHED_UNPACK.items():
        if variant in variants:
            folders[variant] = folders[base] if base in folders else build_cache(args, [base])[base]
    return folders


def variant_stages(variant: str, args) -> list[tuple[str, dict]]:
    """The method stages that build `variant`: calibrated on WikiText-2 for the real model; plain SVD
    and magnitude 2:4 (data-free, the same shapes) for --random-init. RTN is data-free either way:
    the speed depends on the packed shapes, not on the rounding."""
    base, bits = split_variant(variant)
    rand = bool(args.random_init)
    calib = {} if rand else calib_fields(wiki(args.data_dir), args.calib_windows, args.calib_seq, batch_size=4)
    stages = []
    if base.startswith("lowrank"):
        stages.append(("svd" if rand else "saes-svd", {"rank": keep_of(base), **calib}))
    elif base.startswith("prune"):
        stages.append(("prune", {"pattern": "2:4", "score": "magnitude" if rand else "wanda", **calib}))
    embedding = {"embedding_bits": bits} if variant.endswith(EMBEDDING) else {}
    return stages + ([("rtn", {"bits": bits, "group_size": QUANT_GROUP, **embedding})] if bits else [])


def compress_into(args, dense: Path, out: Path, variant: str) -> None:
    from compressor.pipeline import Pipeline

    stages = [{"method": method, **fields} for method, fields in variant_stages(variant, args)]
    log(f"compressing {variant} -> {out}")
    started = time.perf_counter()
    Pipeline.from_recipe({"model": str(dense), "out": str(out), "evaluate": False, "stages": stages}).run()
    log(f"  {variant}: {time.perf_counter() - started:.0f} s")


def load_variant(folder: Path, dtype: torch.dtype, device: str):
    import compressor

    return compressor.load(folder, device=device, dtype=str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------- random init: same shapes


def random_models(args, variants: list[str], dtype, device) -> dict:
    """{variant: model} built from a config.json with random weights (see module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.context import Context

    config = AutoConfig.for_model(**json.loads(Path(args.random_init).read_text()))
    torch.manual_seed(args.seed)
    models = {"dense": AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()}
    for built in dict.fromkeys(CACHED_UNPACK.get(v, v) for v in variants):
        if built not in models:
            models[built] = copy.deepcopy(models["dense"])
            for method, fields in variant_stages(built, args):
                apply_method(models[built], method, fields, Context(quiet=True, device=torch.device(device)))
    return {v: models[CACHED_UNPACK.get(v, v)].to(dtype=dtype) for v in variants}


# ---------------------------------------------------------------- measurements


def tensor_bytes(model) -> int:
    """Bytes of parameters + buffers, tied tensors counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def layer_shapes(models: dict) -> dict:
    """{variant: {"out x in": what that linear became}} — shows both modes build the same shapes."""
    from compressor.layers import compressed_layers

    shapes = {}
    for variant, model in models.items():
        counts: dict = {}
        for layer in compressed_layers(model).values():
            kind = f"rank {layer.rank}" if hasattr(layer, "rank") else layer.layer_type
            if hasattr(layer, "bits"):
                kind = f"{layer.layer_type} int{layer.bits} g{layer.group_size}"
            key = f"{layer.out_features}x{layer.in_features} {kind}"
            counts[key] = counts.get(key, 0) + 1
        shapes[variant] = counts
    return shapes


def memory_worker(args) -> None:
    """Subprocess: load one folder, print its memory readings as one JSON line."""
    import transformers  # noqa: F401  (imported before the baseline, like the model load needs)

    import compressor
    from compressor.kernels.dispatch import cached_unpack

    torch.set_num_threads(1)
    warm_up_libraries(args, cached_unpack)
    trim()
    baseline = proc_status_mb("VmRSS", required=True)
    model = load_variant(Path(args.memory_worker), resolve_dtype(args), "cpu")
    raw = proc_status_mb("VmRSS", required=True)
    hwm = proc_status_mb("VmHWM", required=True)
    trim()  # hand back heap pages freed by the loader (e.g. a dense skeleton replaced by factors)
    loaded = proc_status_mb("VmRSS", required=True)
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.inference_mode(), cached_unpack() if args.cached else contextlib.nullcontext():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                       min_new_tokens=8, pad_token_id=0)
        trim()
        decoded = proc_status_mb("VmRSS", required=True)  # inside the block: cached weights held
    print(json.dumps({
        "rss_after_import_mb": baseline, "rss_after_load_untrimmed_mb": raw, "rss_after_load_mb": loaded,
        "hwm_after_load_mb": hwm, "model_rss_untrimmed_mb": raw - baseline, "model_rss_mb": loaded - baseline,
        "model_hwm_mb": hwm - baseline, "model_rss_after_decode_mb": decoded - baseline,
        "compressor_version": getattr(compressor, "__version__", "?"),
    }))


def warm_up_libraries(args, cached_unpack) -> None:
    """Load and decode with the embedded stories260K (a 260K-parameter Llama) and drop it, so the
    baseline already holds what any model pays once: the Llama modelling and generation code, the
    tokenizer stack, the BLAS workspaces. What the variant adds on top is then its own."""
    import compressor
    from compressor.context import Context

    tiny = compressor.load("default", dtype=str(resolve_dtype(args)).removeprefix("torch."))
    ids = torch.arange(1, 9).unsqueeze(0)
    with torch.inference_mode(), cached_unpack():
        tiny.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                      min_new_tokens=4, pad_token_id=0)
        # One quantized decode row: the compiled CPU GEMV imports inductor and its compiler
        # stack, a once-per-process cost that is not the model's.
        linear = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(resolve_dtype(args))
        apply_method(linear, "rtn", {"bits": 4, "group_size": QUANT_GROUP}, Context(quiet=True))
        linear(torch.randn(1, 64, dtype=resolve_dtype(args)))
    del tiny


def trim() -> None:
    """glibc malloc_trim(0): return free heap pages to the OS, so RSS counts live memory only."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory_fresh(args, folder: Path, cached: bool) -> dict:
    return run_worker(str(Path(__file__).resolve()), ["--memory-worker", str(folder), "--dtype", args.dtype,
                                                      "--device", "cpu", *(["--cached"] if cached else [])])


def prompts(args, tokenizer, vocab_size: int, batch: int) -> torch.Tensor:
    """(batch, prompt_tokens) token ids: WikiText-2 slices when a tokenizer is at hand, else random."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (batch, args.prompt_tokens), generator=generator)
    text = (Path(args.data_dir) / "wikitext-2" / "wiki.test.raw").read_text()[:200_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    stride = (ids.numel() - args.prompt_tokens) // batch
    return torch.stack([ids[i * stride: i * stride + args.prompt_tokens] for i in range(batch)])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A generate() stopping criterion that never stops: it stamps the time of every step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, new_tokens: int, pad_id: int, cached: bool = False) -> dict:
    """Greedy decode of exactly `new_tokens`; {tokens, total_s, decode_s (first -> last token)}."""
    from transformers import StoppingCriteriaList

    from compressor.kernels.dispatch import cached_unpack

    clock = StepClock(input_ids.device)
    synchronize(input_ids.device)
    started = time.perf_counter()
    with cached_unpack() if cached else contextlib.nullcontext():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                             stopping_criteria=StoppingCriteriaList([clock]))
    synchronize(input_ids.device)
    total = time.perf_counter() - started
    return {"tokens": out[:, input_ids.shape[1]:], "total_s": total,
            "decode_s": clock.stamps[-1] - clock.stamps[0] if len(clock.stamps) > 1 else float("nan")}


def time_decodes(args, models: dict, inputs: dict[int, torch.Tensor], pad_id: int, after_repeat) -> dict:
    """{batch: {variant: {"decode_s": [...], "total_s": [...], "tokens": ids}}}, interleaved;
    `after_repeat(runs, complete_repeats)` is called after every decode (the report is rewritten
    each time, so a run stopped by a time limit still leaves its table)."""
    names = list(models)
    runs = {b: {v: {"decode_s": [], "total_s": []} for v in names} for b in inputs}
    for batch, ids in inputs.items():  # warm-up: allocator, caches, lazy init (untimed)
        for variant in names:
            generate(models[variant], ids, min(4, args.new_tokens), pad_id, variant in CACHED_UNPACK)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for batch, ids in inputs.items():
            for variant in order:
                done = generate(models[variant], ids, args.new_tokens, pad_id, variant in CACHED_UNPACK)
                run = runs[batch][variant]
                run["decode_s"].append(done["decode_s"])
                run["total_s"].append(done["total_s"])
                run["tokens"] = done["tokens"].cpu()
                log(f"repeat {repeat} batch {batch} {variant}: "
                    f"{batch * (args.new_tokens - 1) / done['decode_s']:.2f} decode tok/s, "
                    f"{batch * args.new_tokens / done['total_s']:.2f} end-to-end")
                after_repeat(runs, repeat + (variant == order[-1] and batch == list(inputs)[-1]))
    return runs


def rates(args, batch: int, run: dict) -> tuple[list[float], list[float]]:
    """Decode tok/s (first to last new token) and end-to-end tok/s of each repeat."""
    return ([batch * (args.new_tokens - 1) / s for s in run["decode_s"]],
            [batch * args.new_tokens / s for s in run["total_s"]])


def summarize(args, runs: dict, memory: dict, tensor_mb: dict) -> list[dict]:
    rows = []
    for batch, per_variant in runs.items():
        dense = per_variant.get("dense")
        for variant, run in per_variant.items():
            if not run["decode_s"]:
                continue  # not timed yet (the report is written as results come in)
            decode, total = rates(args, batch, run)
            row = {
                "variant": variant, "batch": batch,
                "decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_all": decode,
                "spread": (max(decode) - min(decode)) / statistics.median(decode),
                "e2e_tokens_per_s": statistics.median(total), "e2e_tokens_per_s_all": total,
                "same_tokens_as_dense": (run["tokens"] == dense["tokens"]).float().mean().item()
                if dense and "tokens" in dense else None,
                "tensor_mb": tensor_mb[variant], **memory.get(variant, {}),
            }
            if dense and dense["decode_s"]:
                dense_decode, dense_total = rates(args, batch, dense)
                row["decode_ratio_to_dense"] = row["decode_tokens_per_s"] / statistics.median(dense_decode)
                row["e2e_ratio_to_dense"] = row["e2e_tokens_per_s"] / statistics.median(dense_total)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def render(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    dense_rows = {r["batch"]: r for r in result["rows"] if r["variant"] == "dense"}
    rows = [[r["variant"], r["batch"], f"{r['decode_tokens_per_s']:.2f}", fmt(r.get("decode_ratio_to_dense")),
             per_repeat_ratios(r, base), f"{r['spread'] * 100:.0f} %", f"{r['e2e_tokens_per_s']:.2f}",
             fmt(r.get("e2e_ratio_to_dense")), fmt(r["same_tokens_as_dense"] and 100 * r["same_tokens_as_dense"], 0) + " %" * (r["same_tokens_as_dense"] is not None), f"{r['tensor_mb']:.0f}",
             fmt(r.get("model_rss_after_decode_mb"), 0), ratio(r, base, "model_rss_after_decode_mb"),
             fmt(r.get("model_rss_mb"), 0), fmt(r.get("model_hwm_mb"), 0)]
            for r in result["rows"] for base in [dense_rows.get(r["batch"], {})]]
    baselines = sorted({f"{r['rss_after_import_mb']:.0f}" for r in result["rows"] if "rss_after_import_mb" in r})
    remeasured = cfg.get("memory_measured")
    return "\n".join([
        f"# Decode speed — SmolLM2-135M{' (random init, same shapes)' if cfg['random_init'] else ''}, "
        f"{cfg['device']} {cfg['dtype']}", "",
        f"Run {env['date']} on {env['host']} ({env['device_name']}, {cfg['threads']} torch thread(s), "
        f"{cfg['cpu_count']} CPUs, load average {cfg['loadavg_before']} before / {cfg['loadavg_after']} "
        f"after), git {env['git_sha']}, torch {env['versions']['torch']}, transformers "
        f"{env['versions']['transformers']}.", "",
        f"Command: `{cfg['command']}`" + (f" (memory columns re-measured {remeasured} with `--memory-only`)"
                                          if remeasured else ""), "",
        f"Greedy `generate`, {cfg['prompt_tokens']}-token prompts, exactly {cfg['new_tokens']} new tokens, "
        f"median of {cfg['repeats']} repeats, variants interleaved per repeat. Decode tok/s = batch x "
        f"{cfg['new_tokens'] - 1} / time from the first to the last generated token (prefill excluded); "
        "end-to-end tok/s = batch x new tokens / wall time of `generate` (prefill included). Ratios are "
        "against dense in this run.", "",
        *table(["variant", "batch", "decode tok/s", "× dense", "× dense per repeat", "spread", "end-to-end tok/s",
                "× dense", "same tokens as dense", "tensor MB", "RSS after decode MB", "× dense",
                "RSS after load MB", "load peak MB"], rows), "",
        *(n.replace("{baseline}", "/".join(baselines) + " MB") for n in result["notes"]), "", RATIO_LEGEND,
        *(["", *CPU_PATHS] if cfg["device"] == "cpu" else [])]) + "\n"


RATIO_LEGEND = ("× dense = ratio of the medians; × dense per repeat = median (min–max) of the "
                "ratios within each repeat (variant and dense ran minutes apart, so this follows a "
                "drifting machine load better).")
CPU_PATHS = [
    "How the compressed layers run on CPU (`compressor.kernels`, reference semantics, no Triton):",
    "- low rank: `F.linear(F.linear(x, V), U)` on the factors as stored (views only; no per-call copy, "
    "checked by tests/kernels/test_cpu_fast_path.py), dispatched without per-call backend resolution "
    "or operand re-checks. Pre-transposed (in, out) copies were not measurably faster at these shapes "
    "in a micro-benchmark on this machine and would double the factors' memory, so there are none.",
    "- int8 / int4 (weight-only, packed codes + one scale per 64 inputs): one decode row runs a "
    "dequantize-fused GEMV compiled by inductor (`kernels/_cpu_quant.py`), which reads only the packed "
    "bytes; prompts (several rows) take the reference, one dequantize + `F.linear` per call. torch's "
    "`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` were 15-22x slower than float32 `F.linear` on "
    "this CPU (issue 19), so they are not used.",
    "- 2:4: torch has no CPU kernel for a packed 2:4 weight, so `prune-2:4` unpacks values + 2-bit "
    "positions to a dense matrix on every call (the reference's definition): one unpack per layer per "
    "decode step, slower than dense. `prune-2:4-cached` runs the same model inside "
    "`compressor.kernels.dispatch.cached_unpack()`: each weight is unpacked once and reused, at dense speed but "
    "holding the dense matrix beside the packed one (see the after-decode memory). The packed format "
    "pays off on disk and where a kernel reads it directly (the Triton 2:4 kernel on CUDA, "
    "BENCHMARKS K3), not in CPU decoding.",
]


def ratio(row: dict, base: dict, key: str) -> str:
    return fmt(row[key] / base[key]) if row.get(key) is not None and base.get(key) else "–"


def per_repeat_ratios(row: dict, dense: dict) -> str:
    """median (min-max) of variant / dense decode tok/s within each repeat: the two ran minutes
    apart, so this follows the machine's load better than the ratio of the two medians."""
    pairs = zip(row["decode_tokens_per_s_all"], dense.get("decode_tokens_per_s_all", []), strict=False)
    ratios = [a / b for a, b in pairs]
    if not ratios:
        return "–"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def notes(args, random_init: bool, dtype) -> list[str]:
    spread = ("spread = (max - min) / median decode tok/s over the repeats: how noisy the shared "
              "machine was.")
    memory = ("Memory, each variant in a fresh subprocess, all figures minus the baseline: RSS after "
              "decode = VmRSS after an 8-token greedy decode (every weight touched; for "
              "prune-2:4-cached inside `cached_unpack()`, unpacked weights held) — the comparable "
              "steady state, and the ratio the P3 target is judged on; RSS after load = VmRSS right "
              "after `compressor.load` (dense: transformers memory-maps model.safetensors, so its "
              "weights become resident only when first read; compressed checkpoints are read whole); "
              "load peak = VmHWM after loading (compressor.load builds the dense model from its "
              "config, swaps the compressed layers in, then reads the state dict: a transient well "
              "above the compressed size). glibc `malloc_trim(0)` runs before each reading (freed heap "
              "pages returned; untrimmed figures in the JSON). Baseline = VmRSS of the same process after "
              "importing torch, transformers, compressor and loading + decoding with the embedded "
              "260K-parameter stories260K (then freed), so library code and the tokenizer stack are "
              "not counted ({baseline}). tensor MB = parameters + buffers.")
    if random_init:
        memory = ("Memory: tensor MB = parameters + buffers (random-init mode has no checkpoint to "
                  "load, so no RSS figures).")
    source = ("Weights: random init from the config (plain SVD at uniform ranks; magnitude 2:4): same "
              "shapes as the real run, so the same speed; the generated tokens mean nothing."
              if random_init else
              f"Weights: {Path(args.smollm2).name} dequantized to float32; saes-svd and Wanda 2:4 calibrated "
              f"on {args.calib_windows} x {args.calib_seq} tokens of WikiText-2 (small on purpose: decode "
              "speed depends on the layer shapes, not on the calibration quality).")
    quantized = ("int8 / int4 / lowrank-0.6+int4: symmetric RTN codes in groups of 64 inputs (the rank side of "
                 "a quantized low-rank factor per-channel where 64 does not divide it) with scales in the model "
                 "dtype, on the block linears only: the tied embedding / lm_head stays float (49152 x 576, "
                 "113 MB in float32), which bounds how far their memory ratio can fall.")
    return [spread, memory, source, quantized,
            f"dtype {str(dtype).removeprefix('torch.')} for every variant (dense and compressed alike)."]


def report_name(args) -> str:
    return f"decode_speed_{args.tag}" if args.tag else "decode_speed"


def write_report(args, result: dict) -> str:
    report = Report(args.out, report_name(args), render)
    report.state = result
    report.write()
    return render(result)


def remeasure_memory(args) -> None:
    """--memory-only: the memory columns of an existing report again, each variant in a fresh process."""
    result = json.loads((Path(args.out) / f"{report_name(args)}.json").read_text())
    folders = build_cache(args, sorted({r["variant"] for r in result["rows"]}))
    for variant in folders:
        log(f"memory of {variant} in a fresh process")
        fresh = measure_memory_fresh(args, folders[variant], variant in CACHED_UNPACK)
        for row in (r for r in result["rows"] if r["variant"] == variant):
            row.update(fresh)
    result["notes"] = notes(args, False, resolve_dtype(args))
    result["config"]["memory_measured"] = f"separately, git {environment()['git_sha']}"
    write_report(args, result)


def load_models(args, variants: list[str], dtype, device, memory: dict):
    """({variant: model}, tokenizer or None); the real model's memory readings go into `memory`."""
    if args.random_init:
        return random_models(args, variants, dtype, device), None
    from transformers import AutoTokenizer

    folders, models = build_cache(args, variants), {}
    for variant in variants:
        log(f"memory of {variant} in a fresh process")
        memory[variant] = measure_memory_fresh(args, folders[variant], variant in CACHED_UNPACK)
    for variant in variants:
        built = CACHED_UNPACK.get(variant, variant)
        if built not in models:
            models[built] = load_variant(folders[variant], dtype, args.device).eval()
        models[variant] = models[built]
    return {v: models[v] for v in variants}, AutoTokenizer.from_pretrained(folders["dense"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args) or 0
    if args.memory_only:
        remeasure_memory(args)
    if args.render or args.memory_only:
        print(rerender(Path(args.out), report_name(args), render))
        return 0
    from compressor.report.env import collect_env

    device, dtype = torch.device(args.device), resolve_dtype(args)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    variants = [v for v in args.variants.split(",") if v and not (device.type == "cuda" and v in CACHED_UNPACK)]
    unknown = [v for v in variants if v not in KNOWN]  # on CUDA the 2:4 kernel reads the packed weight
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {list(KNOWN)}")
    loadavg_before, memory = os.getloadavg()[0], {}
    models, tokenizer = load_models(args, variants, dtype, device, memory)
    some = next(iter(models.values()))
    pad_id = some.config.eos_token_id if isinstance(some.config.eos_token_id, int) else 0
    inputs = {b: prompts(args, tokenizer, some.config.vocab_size, b).to(device)
              for b in (int(x) for x in args.batches.split(","))}
    tensor_mb = {v: tensor_bytes(m) / 2**20 for v, m in models.items()}
    config = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": str(device),
              "dtype": str(dtype).removeprefix("torch."), "threads": threads, "cpu_count": os.cpu_count(),
              "random_init": args.random_init, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "repeats": args.repeats, "loadavg_before": f"{loadavg_before:.2f}", "machine": platform.machine(),
              "calibration": None if args.random_init else f"{args.calib_windows}x{args.calib_seq}"}

    def report(runs: dict, repeats_done: int) -> str:  # rewritten after every decode
        config.update(repeats=repeats_done, loadavg_after=f"{os.getloadavg()[0]:.2f}")
        return write_report(args, {"benchmark": "decode_speed", "env": collect_env(device, args.seed),
                                   "config": config, "rows": summarize(args, runs, memory, tensor_mb),
                                   "layer_shapes": layer_shapes(models),
                                   "notes": notes(args, bool(args.random_init), dtype)})

    print(report(time_decodes(args, models, inputs, pad_id, report), args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())

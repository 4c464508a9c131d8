"""P3 decode speed: greedy decoding of SmolLM2-135M, dense vs compressed, one process (BENCHMARKS.md).

    nice -n 5 python benchmarks/decode_speed.py                       # CPU, the real GGUF model
    python benchmarks/decode_speed.py --device cuda --random-init benchmarks/smollm2_135m_config.json
    python benchmarks/decode_speed.py --render [--tag quant]          # the .md again from the .json

Variants (VARIANTS): `dense`; saes-svd at keep 0.6 / 0.8; Wanda 2:4 stored packed (`-cached`: inside
`cached_unpack()`, CPU only); symmetric RTN in groups of 64 (`int8`, `int4`, `lowrank-0.6+int4`;
`-emb`: the tied embedding too). All decode the same prompts at each batch size, interleaved inside
every repeat (the order rotates) so load noise spreads over all of them; render() says what each column reads.

Memory: each variant's checkpoint (built once into `--cache-dir`) is loaded in a fresh subprocess
(`memory_worker`). `--random-init CONFIG_JSON`: the same shapes with random weights, for machines the GGUF
cannot reach. dtype float32 on CPU (`--dtype`), bfloat16 on CUDA; `--threads` default 1 on CPU.
"""

import argparse
import collections
import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch
from harness import (Report, apply_method, arguments, calib_fields, columns, command_line, fmt, log, markdown,
                     numbers, pick, provenance, rerender, run_worker, wiki)

from compressor.kernels.dispatch import cached_unpack
from compressor.memory import proc_status_mb
from compressor.report.env import collect_env, git_sha

# variant -> (base model, RTN bits of every block linear), as the docstring says; "-emb": only when named
VARIANTS = {"dense": ("dense", None), "lowrank-0.6": ("lowrank-0.6", None), "lowrank-0.8": ("lowrank-0.8", None),
            "prune-2:4": ("prune-2:4", None), "prune-2:4-cached": ("prune-2:4", None), "int8": ("dense", 8),
            "int4": ("dense", 4), "lowrank-0.6+int4": ("lowrank-0.6", 4), "int8-emb": ("dense", 8),
            "int4-emb": ("dense", 4)}
CALIBRATED = {"lowrank-0.6": ("saes-svd", {"rank": 0.6}), "lowrank-0.8": ("saes-svd", {"rank": 0.8}),
              "prune-2:4": ("prune", {"pattern": "2:4", "score": "wanda"})}
DATA_FREE = {"lowrank-0.6": ("svd", {"rank": 0.6}), "lowrank-0.8": ("svd", {"rank": 0.8}),
             "prune-2:4": ("prune", {"pattern": "2:4", "score": "magnitude"})}
QUANT_GROUP = 64  # one group size for every quantized matrix


def parse_args(argv=None) -> argparse.Namespace:
    p = arguments(__doc__, smollm2=True, data=True, threads=0)
    p.add_argument("--random-init", metavar="CONFIG_JSON", help="random weights from this config.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if not v.endswith("-emb")))
    p.add_argument("--batches", default="1,8")
    numbers(p, (("new-tokens", 128), ("prompt-tokens", 32), ("repeats", 5), ("calib-windows", 16),
                ("calib-seq", 256), ("seed", 0)))
    p.add_argument("--cache-dir", default="/tmp/compressor-decode-cache")
    p.add_argument("--tag", default="", help="report names become decode_speed_<tag>.*")
    p.add_argument("--memory-only", action="store_true", help="re-measure the memory columns of a report")
    p.add_argument("--memory-worker", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype_name = args.dtype if args.dtype != "auto" else "bfloat16" if "cuda" in args.device else "float32"
    return args


def variant_stages(variant: str, args) -> list[tuple[str, dict]]:
    """The method stages that build `variant`: calibrated for the real model, data-free (the same shapes)
    for --random-init; RTN is data-free either way (speed depends on the packed shapes, not the rounding)."""
    base, bits = VARIANTS[variant]
    built = (DATA_FREE if args.random_init else CALIBRATED).get(base)
    calib = {} if args.random_init else calib_fields(wiki(args.data_dir), args.calib_windows, args.calib_seq,
                                                     batch_size=4)
    stages = [(built[0], {**built[1], **calib})] if built else []
    embedding = {"embedding_bits": bits} if variant.endswith("-emb") else {}
    return stages + ([("rtn", {"bits": bits, "group_size": QUANT_GROUP, **embedding})] if bits else [])


def build_cache(args, variants: list[str]) -> dict[str, Path]:
    """Write (once) a dense float32 HF folder and one compressed checkpoint per variant."""
    from compressor.models import load_model, save_checkpoint
    from compressor.pipeline import Pipeline

    cache = Path(args.cache_dir)
    folders = {"dense": cache / "dense"}
    if not (folders["dense"] / "config.json").is_file():
        log(f"dequantizing {args.smollm2} -> {folders['dense']}")
        loaded = load_model(args.smollm2, dtype="float32")
        save_checkpoint(loaded.model, loaded.tokenizer, folders["dense"])
    for variant in dict.fromkeys(v.removesuffix("-cached") for v in variants if v != "dense"):
        folders[variant] = cache / f"{variant.replace(':', '')}-c{args.calib_windows}x{args.calib_seq}"
        if not (folders[variant] / "config.json").is_file():
            log(f"compressing {variant} -> {folders[variant]}")
            stages = [{"method": method, **fields} for method, fields in variant_stages(variant, args)]
            Pipeline.from_recipe({"model": str(folders["dense"]), "out": str(folders[variant]), "evaluate": False,
                                  "stages": stages}).run()
    return {v: folders[v.removesuffix("-cached")] for v in variants}


def load_models(args, variants: list[str], device):
    """({variant: model}, tokenizer, {variant: memory readings}): build_cache's checkpoints, each one's
    memory read in a fresh process; a -cached variant shares its base's model object."""
    from transformers import AutoTokenizer

    import compressor

    if args.random_init:
        return random_models(args, variants, device), None, {}
    folders = build_cache(args, variants)
    memory = fresh_memory(args, folders)
    models = {folder: compressor.load(folder, device=args.device, dtype=args.dtype_name).eval()
              for folder in dict.fromkeys(folders.values())}
    tokenizer = AutoTokenizer.from_pretrained(Path(args.cache_dir) / "dense")
    return {v: models[folders[v]] for v in variants}, tokenizer, memory


def random_models(args, variants: list[str], device) -> dict:
    """{variant: model} built from the --random-init config.json with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor.context import Context

    config = AutoConfig.for_model(**json.loads(Path(args.random_init).read_text()))
    torch.manual_seed(args.seed)
    models = {"dense": AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()}
    for built in dict.fromkeys(v.removesuffix("-cached") for v in variants):
        if built not in models:
            models[built] = copy.deepcopy(models["dense"])
            for method, fields in variant_stages(built, args):
                apply_method(models[built], method, fields, Context(quiet=True, device=torch.device(device)))
    return {v: models[v.removesuffix("-cached")].to(dtype=getattr(torch, args.dtype_name)) for v in variants}


def tensor_bytes(model) -> int:
    """Bytes of parameters + buffers, tied tensors counted once."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values())


def layer_shapes(models: dict) -> dict:
    """{variant: {"out x in kind": count}}: shows that both modes build the same shapes."""
    from compressor.layers import compressed_layers

    def kind(layer) -> str:
        if hasattr(layer, "bits"):
            return f"{layer.layer_type} int{layer.bits} g{layer.group_size}"
        return f"rank {layer.rank}" if hasattr(layer, "rank") else layer.layer_type

    return {variant: dict(collections.Counter(f"{layer.out_features}x{layer.in_features} {kind(layer)}"
                                              for layer in compressed_layers(model).values()))
            for variant, model in models.items()}


def memory_worker(args) -> None:
    """Subprocess: load one folder, print its memory readings as one JSON line."""
    import transformers  # noqa: F401  (imported before the baseline, like the model load needs)

    import compressor
    from compressor.context import Context

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype_name)
    # The baseline holds what any model pays once (Llama code, tokenizer stack, BLAS workspaces; notes():
    # Baseline), and inductor, which one quantized decode row imports for the compiled CPU GEMV.
    tiny = compressor.load("default", dtype=args.dtype_name)
    with torch.inference_mode(), cached_unpack():
        greedy(tiny, torch.arange(1, 9).unsqueeze(0), 4)
        linear = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(dtype)
        apply_method(linear, "rtn", {"bits": 4, "group_size": QUANT_GROUP}, Context(quiet=True))
        linear(torch.randn(1, 64, dtype=dtype))
    del tiny
    baseline = rss("VmRSS")
    model = compressor.load(Path(args.memory_worker), device="cpu", dtype=args.dtype_name)
    raw, hwm = proc_status_mb("VmRSS", required=True), proc_status_mb("VmHWM", required=True)
    loaded = rss("VmRSS")  # trimmed: heap pages freed by the loader (a dense skeleton replaced by factors)
    with torch.inference_mode(), cached_unpack() if args.cached else contextlib.nullcontext():
        greedy(model, torch.arange(1, 9).unsqueeze(0), 8)
        decoded = rss("VmRSS")  # inside the block: cached weights held
    print(json.dumps({"rss_after_import_mb": baseline, "rss_after_load_untrimmed_mb": raw,
                      "rss_after_load_mb": loaded, "hwm_after_load_mb": hwm, "model_rss_untrimmed_mb": raw - baseline,
                      "model_rss_mb": loaded - baseline, "model_hwm_mb": hwm - baseline,
                      "model_rss_after_decode_mb": decoded - baseline, "compressor_version": compressor.__version__}))


def rss(field: str) -> float:
    """/proc/self/status `field` after glibc malloc_trim(0): free heap pages returned to the OS, so
    it counts live memory only."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return proc_status_mb(field, required=True)


def fresh_memory(args, folders: dict[str, Path]) -> dict:
    """{variant: memory readings}, each variant's checkpoint loaded in its own fresh process."""
    memory = {}
    for variant, folder in folders.items():
        log(f"memory of {variant} in a fresh process")
        memory[variant] = run_worker(str(Path(__file__).resolve()), [
            "--memory-worker", str(folder), "--dtype", args.dtype, "--device", "cpu",
            *(["--cached"] if variant.endswith("-cached") else [])])
    return memory


def prompts(args, tokenizer, vocab_size: int, batch: int) -> torch.Tensor:
    """(batch, prompt_tokens) token ids: WikiText-2 slices when a tokenizer is at hand, else random."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, vocab_size, (batch, args.prompt_tokens), generator=generator)
    ids = tokenizer(Path(wiki(args.data_dir)).read_text()[:200_000], return_tensors="pt").input_ids[0]
    stride = (ids.numel() - args.prompt_tokens) // batch
    return torch.stack([ids[i * stride: i * stride + args.prompt_tokens] for i in range(batch)])


def synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def greedy(model, input_ids: torch.Tensor, new_tokens: int, pad_id: int = 0, **generate_kwargs):
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                          **generate_kwargs)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, new_tokens: int, pad_id: int, cached: bool = False) -> dict:
    """Greedy decode of exactly `new_tokens`; {tokens, total_s, decode_s (first -> last token)}."""
    from transformers import StoppingCriteriaList

    stamps = []

    def stamp(ids, scores, **kwargs):  # a stopping criterion that never stops: it stamps every step
        stamps.append(synchronized_clock(ids.device))
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

    started = synchronized_clock(input_ids.device)
    with cached_unpack() if cached else contextlib.nullcontext():
        out = greedy(model, input_ids, new_tokens, pad_id, stopping_criteria=StoppingCriteriaList([stamp]))
    total = synchronized_clock(input_ids.device) - started
    return {"tokens": out[:, input_ids.shape[1]:], "total_s": total,
            "decode_s": stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")}


def time_decodes(args, models: dict, inputs: dict[int, torch.Tensor], pad_id: int, after_repeat) -> dict:
    """{batch: {variant: {"decode": [tok/s], "e2e": [tok/s], "tokens": ids}}}, interleaved;
    `after_repeat(runs, complete_repeats)` is called after every decode (the report is rewritten
    each time, so a run stopped by a time limit still leaves its table)."""
    names = list(models)
    runs = {b: {v: {"decode": [], "e2e": []} for v in names} for b in inputs}
    for batch, ids in inputs.items():  # warm-up: allocator, caches, lazy init (untimed)
        for variant in names:
            generate(models[variant], ids, min(4, args.new_tokens), pad_id, variant.endswith("-cached"))
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for batch, ids in inputs.items():
            for variant in order:
                done = generate(models[variant], ids, args.new_tokens, pad_id, variant.endswith("-cached"))
                run = runs[batch][variant]
                run["decode"].append(batch * (args.new_tokens - 1) / done["decode_s"])  # first to last token
                run["e2e"].append(batch * args.new_tokens / done["total_s"])
                run["tokens"] = done["tokens"].cpu()
                log(f"repeat {repeat} batch {batch} {variant}: {run['decode'][-1]:.2f} decode tok/s, "
                    f"{run['e2e'][-1]:.2f} end-to-end")
                after_repeat(runs, repeat + (variant == order[-1] and batch == list(inputs)[-1]))
    return runs


def summarize(runs: dict, memory: dict, tensor_mb: dict) -> list[dict]:
    """One row per (batch, variant) timed so far: medians over repeats (render divides them by dense's)."""
    rows = []
    for batch, per_variant in runs.items():
        dense = per_variant.get("dense") or {}
        for variant, run in per_variant.items():
            decode, total = run["decode"], run["e2e"]
            if not decode:
                continue  # not timed yet (the report is written as results come in)
            rows.append({"variant": variant, "batch": batch, "decode_tokens_per_s": median(decode),
                         "decode_tokens_per_s_all": decode, "spread": (max(decode) - min(decode)) / median(decode),
                         "e2e_tokens_per_s": median(total), "e2e_tokens_per_s_all": total,
                         "same_tokens_as_dense": (run["tokens"] == dense["tokens"]).float().mean().item()
                         if "tokens" in dense else None, "tensor_mb": tensor_mb[variant], **memory.get(variant, {})})
    return rows


def per_repeat_ratios(row: dict) -> str:
    """median (min-max) of variant / dense decode tok/s within each repeat."""
    pairs = zip(row["decode_tokens_per_s_all"], row["dense"].get("decode_tokens_per_s_all", []), strict=False)
    ratios = [a / b for a, b in pairs]
    return f"{median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else "–"


def to_dense(key: str):
    """A cell: the row's `key` over its batch's dense row's (– where either has none)."""
    return lambda row: (fmt(row[key] / row["dense"][key]) if row.get(key) is not None and row["dense"].get(key)
                        else "–")


def same_tokens(row: dict) -> str:
    share = row["same_tokens_as_dense"]
    return "–" if share is None else fmt(100 * share, 0) + " %"


def reading(key: str):
    """A memory cell in MB, – where the run has no memory readings (--random-init)."""
    return lambda row: fmt(row.get(key), 0)


# the table; a row carries the dense row of its batch as "dense"
COLUMNS = [
    ("variant", "{variant}"), ("batch", "{batch}"), ("decode tok/s", "{decode_tokens_per_s:.2f}"),
    ("× dense", to_dense("decode_tokens_per_s")), ("× dense per repeat", per_repeat_ratios),
    ("spread", lambda r: f"{r['spread'] * 100:.0f} %"), ("end-to-end tok/s", "{e2e_tokens_per_s:.2f}"),
    ("× dense", to_dense("e2e_tokens_per_s")), ("same tokens as dense", same_tokens), ("tensor MB", "{tensor_mb:.0f}"),
    ("RSS after decode MB", reading("model_rss_after_decode_mb")), ("× dense", to_dense("model_rss_after_decode_mb")),
    ("RSS after load MB", reading("model_rss_mb")), ("load peak MB", reading("model_hwm_mb"))]
RATIO_LEGEND = ("× dense = ratio of the medians; × dense per repeat = median (min–max) of the ratios within "
                "each repeat (variant and dense ran minutes apart, so this follows a drifting machine load better).")
CPU_PATHS = [
    "How the compressed layers run on CPU (`compressor.kernels`, reference semantics, no Triton):",
    ("- low rank: `F.linear(F.linear(x, V), U)` on the factors as stored (views only; no per-call copy, checked by "
    "tests/kernels/test_cpu_fast_path.py), dispatched without per-call backend resolution or operand re-checks. "
    "Pre-transposed (in, out) copies were not measurably faster at these shapes in a micro-benchmark on this "
    "machine and would double the factors' memory, so there are none."),
    ("- int8 / int4 (weight-only, packed codes + one scale per 64 inputs): one decode row runs a dequantize-fused "
    "GEMV compiled by inductor (`kernels/_cpu_quant.py`), which reads only the packed bytes; prompts (several "
    "rows) take the reference, one dequantize + `F.linear` per call. torch's `_weight_int8pack_mm` / "
    "`_weight_int4pack_mm_for_cpu` were 15-22x slower than float32 `F.linear` on this CPU (issue 19), so they "
    "are not used."),
    ("- 2:4: torch has no CPU kernel for a packed 2:4 weight, so `prune-2:4` unpacks values + 2-bit positions to "
    "a dense matrix on every call (the reference's definition): one unpack per layer per decode step, slower "
    "than dense. `prune-2:4-cached` runs the same model inside `compressor.kernels.dispatch.cached_unpack()`: "
    "each weight is unpacked once and reused, at dense speed but holding the dense matrix beside the packed one "
    "(see the after-decode memory). The packed format pays off on disk and where a kernel reads it directly (the "
    "Triton 2:4 kernel on CUDA, BENCHMARKS K3), not in CPU decoding.")]


def render(result: dict) -> str:
    env, cfg, remeasured = result["env"], result["config"], result["config"].get("memory_measured")
    dense = {r["batch"]: r for r in result["rows"] if r["variant"] == "dense"}
    baselines = sorted({f"{r['rss_after_import_mb']:.0f}" for r in result["rows"] if "rss_after_import_mb" in r})
    return markdown(
        f"# Decode speed — SmolLM2-135M{' (random init, same shapes)' if cfg['random_init'] else ''}, "
        f"{cfg['device']} {cfg['dtype']}",
        provenance({**env, "device_name": f"{env['device_name']}, {cfg['threads']} torch thread(s), {cfg['cpu_count']} "
                    f"CPUs, load average {cfg['loadavg_before']} before / {cfg['loadavg_after']} after"}),
        f"Command: `{cfg['command']}`" + (f" (memory columns re-measured {remeasured} with `--memory-only`)"
                                          if remeasured else ""),
        f"Greedy `generate`, {cfg['prompt_tokens']}-token prompts, exactly {cfg['new_tokens']} new tokens, "
        f"median of {cfg['repeats']} repeats, variants interleaved per repeat. Decode tok/s = batch x "
        f"{cfg['new_tokens'] - 1} / time from the first to the last generated token (prefill excluded); "
        "end-to-end tok/s = batch x new tokens / wall time of `generate` (prefill included). Ratios are "
        "against dense in this run.",
        columns(COLUMNS, [{**r, "dense": dense.get(r["batch"], {})} for r in result["rows"]]),
        [n.replace("{baseline}", "/".join(baselines) + " MB") for n in result["notes"]], RATIO_LEGEND,
        CPU_PATHS if cfg["device"] == "cpu" else None)


def notes(args) -> list[str]:
    """The report's notes on its method (stored in its JSON: they describe the run that wrote it)."""
    spread = "spread = (max - min) / median decode tok/s over the repeats: how noisy the shared machine was."
    memory = ("Memory, each variant in a fresh subprocess, all figures minus the baseline: RSS after decode = "
              "VmRSS after an 8-token greedy decode (every weight touched; for prune-2:4-cached inside "
              "`cached_unpack()`, unpacked weights held) — the comparable steady state, and the ratio the P3 "
              "target is judged on; RSS after load = VmRSS right after `compressor.load` (dense: transformers "
              "memory-maps model.safetensors, so its weights become resident only when first read; compressed "
              "checkpoints are read whole); load peak = VmHWM after loading (compressor.load builds the dense "
              "model from its config, swaps the compressed layers in, then reads the state dict: a transient "
              "well above the compressed size). glibc `malloc_trim(0)` runs before each reading (freed heap pages "
              "returned; untrimmed figures in the JSON). Baseline = VmRSS of the same process after importing "
              "torch, transformers, compressor and loading + decoding with the embedded 260K-parameter "
              "stories260K (then freed), so library code and the tokenizer stack are not counted ({baseline}). "
              "tensor MB = parameters + buffers.")
    source = (f"Weights: {Path(args.smollm2).name} dequantized to float32; saes-svd and Wanda 2:4 calibrated on "
              f"{args.calib_windows} x {args.calib_seq} tokens of WikiText-2 (small on purpose: decode speed "
              "depends on the layer shapes, not on the calibration quality).")
    if args.random_init:
        memory = ("Memory: tensor MB = parameters + buffers (random-init mode has no checkpoint to load, so no "
                  "RSS figures).")
        source = ("Weights: random init from the config (plain SVD at uniform ranks; magnitude 2:4): same shapes "
                  "as the real run, so the same speed; the generated tokens mean nothing.")
    quantized = ("int8 / int4 / lowrank-0.6+int4: symmetric RTN codes in groups of 64 inputs (the rank side of a "
                 "quantized low-rank factor per-channel where 64 does not divide it) with scales in the model "
                 "dtype, on the block linears only: the tied embedding / lm_head stays float (49152 x 576, 113 MB "
                 "in float32), which bounds how far their memory ratio can fall.")
    dtype = f"dtype {args.dtype_name} for every variant (dense and compressed alike)."
    return [spread, memory, source, quantized, dtype]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args)
    report = Report(args.out, f"decode_speed_{args.tag}" if args.tag else "decode_speed", render)
    if args.memory_only:  # the memory columns of an existing report again, each variant in a fresh process
        if "config" not in report.state:
            sys.exit(f"error: `{args.out}/{report.name}.json` not found; run the benchmark first (no --memory-only)")
        memory = fresh_memory(args, build_cache(args, sorted({r["variant"] for r in report.state["rows"]})))
        for row in report.state["rows"]:
            row.update(memory[row["variant"]])
        report.state["notes"] = notes(args)
        report.state["config"]["memory_measured"] = f"separately, git {git_sha()}"
        report.write()
    if args.render or args.memory_only:
        return print(rerender(Path(args.out), report.name, render))
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    on_cuda = device.type == "cuda"  # where the 2:4 kernel reads the packed weight: no -cached variant
    variants = [v for v in pick(args.variants, list(VARIANTS)) if not (on_cuda and v.endswith("-cached"))]
    config = {"command": command_line(), "device": str(device), "dtype": args.dtype_name, "threads": threads,
              "cpu_count": os.cpu_count(), "loadavg_before": f"{os.getloadavg()[0]:.2f}", "machine": platform.machine(),
              **{k: getattr(args, k) for k in ("random_init", "new_tokens", "prompt_tokens", "repeats")},
              "calibration": None if args.random_init else f"{args.calib_windows}x{args.calib_seq}"}
    models, tokenizer, memory = load_models(args, variants, device)
    some = next(iter(models.values()))
    pad_id = some.config.eos_token_id if isinstance(some.config.eos_token_id, int) else 0
    inputs = {b: prompts(args, tokenizer, some.config.vocab_size, b).to(device)
              for b in (int(x) for x in args.batches.split(","))}
    tensor_mb = {v: tensor_bytes(m) / 2**20 for v, m in models.items()}

    def write(runs: dict, repeats_done: int) -> None:  # rewritten after every decode
        config.update(repeats=repeats_done, loadavg_after=f"{os.getloadavg()[0]:.2f}")
        report.state = {"benchmark": "decode_speed", "env": collect_env(device, args.seed), "config": config,
                        "rows": summarize(runs, memory, tensor_mb), "layer_shapes": layer_shapes(models),
                        "notes": notes(args)}
        report.write()

    write(time_decodes(args, models, inputs, pad_id, write), args.repeats)
    print(render(report.state))


if __name__ == "__main__":
    sys.exit(main())

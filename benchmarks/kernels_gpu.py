"""K-series kernel benchmarks (BENCHMARKS.md section K) and the E1 decode benchmark, on one GPU.

1. Correctness first: every Triton kernel against the fp64 reference (`compressor.kernels.ref` on
   the same rounded inputs) on fresh random inputs, including ragged shapes.
2. Ceilings measured in the same run: large-tensor copy bandwidth and the bf16 GEMM rate (8192^3).
3. K1-K6 (`kernel_rows`) and K7 MeZO against their baselines with `triton.testing.do_bench` (median;
   it clears L2 before every call), rotating weight copies (>= 4x the 60 MB L2), bf16, at SHAPES x
   BATCHES: us, TB/s on the bytes the kernel must move, % of the copy ceiling, TFLOP/s, speedups,
   and the BENCHMARKS targets met / missed.
4. E1: a 7B-shaped stack (32 x q,k,v,o 4096^2, gate/up 4096->11008, down 11008->4096) at batch 1,
   dense vs low rank keep 0.6, captured in a CUDA graph: ms/token against the bytes floor.

Writes <out>/kernels_gpu.{json,md}, rewritten after each part: a run stopped by a time limit keeps
what was done.
"""

import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Report, arguments, markdown, rerender, table

L2_BYTES = 60e6
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (in, out)
BATCHES = [1, 16, 512, 4096]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
LORA_RANK, DSEE_NNZ, SCALING, EPS = 16, 64, 2.0, 1e-3  # EPS: MeZO's perturbation
OPS = ["low_rank_linear", "nm_linear", "dense_sparse_linear", "lora_linear", "dsee_linear", "dsee_nm_linear"]


def environment(device: torch.device) -> dict:
    from compressor.report.env import collect_env

    env = collect_env(device, 0)
    v = env["versions"]
    return {"date": env["date"], "gpu": env["device_name"] if device.type == "cuda" else "none (CPU interpreter)",
            "torch": v["torch"], "triton": v["triton"], "cuda": torch.version.cuda, "python": v["python"],
            "git": env["git_sha"][:10]}


def kernels():
    """(reference module, Triton module): imported late, after --cpu-smoke set TRITON_INTERPRET."""
    from compressor.kernels import ref
    from compressor.kernels import triton as tri

    return ref, tri


def rank_for(keep: float, in_f: int, out_f: int) -> int:
    """BENCHMARKS' protocol: r = floor(keep * m * n / (m + n))."""
    return max(1, math.floor(keep * in_f * out_f / (in_f + out_f)))


def _w(rows, cols, dtype, device):
    return torch.randn(rows, cols, device=device, dtype=torch.float32).div_(cols**0.5).to(dtype)


def _packed_24(rows, cols, dtype, device):
    """Random 2:4 matrix (rows, cols) -> (dense, the kernels' packed arguments: values, indices, 2, 4, cols)."""
    from compressor.kernels.dispatch import compress_nm_indices, nm_mask, pack_nm

    dense = _w(rows, cols, dtype, device)
    dense = dense * nm_mask(dense.float().abs(), 2, 4)
    values, indices = pack_nm(dense, 2, 4)
    return dense, (values, compress_nm_indices(indices, 4), 2, 4, cols)


def build(op: str, in_f: int, out_f: int, dtype, device, keep: float = 0.5, bias=True) -> dict:
    """Arguments of `op` plus the dense pieces the baselines need."""
    b = torch.randn(out_f, device=device).to(dtype) if bias else None
    if op == "low_rank_linear":
        r = rank_for(keep, in_f, out_f)
        u, v = _w(out_f, r, dtype, device), _w(r, in_f, dtype, device)
        return {"args": (u, v, b), "u": u, "v": v, "rank": r}
    if op == "nm_linear":
        dense, packed = _packed_24(out_f, in_f, dtype, device)
        return {"args": (*packed, b), "dense": dense}
    if op == "dense_sparse_linear":
        k = max(4, in_f // 4 // 4 * 4)
        s_t, s_packed = _packed_24(in_f, k, dtype, device)  # S.T (in, k)
        d = _w(out_f, k, dtype, device)
        return {"args": (d, *s_packed, b), "d": d, "s": s_t.T.contiguous(), "k": k}
    a, lb = _w(LORA_RANK, in_f, dtype, device), _w(out_f, LORA_RANK, dtype, device)
    delta = () if op == "lora_linear" else (torch.randint(0, out_f, (DSEE_NNZ,), device=device),
                                            torch.randint(0, in_f, (DSEE_NNZ,), device=device),
                                            torch.randn(DSEE_NNZ, device=device).mul_(0.1).to(dtype))
    if op == "dsee_nm_linear":
        w, head = _packed_24(out_f, in_f, dtype, device)
    else:
        w = _w(out_f, in_f, dtype, device)
        head = (w,)
    return {"args": (*head, a, lb, SCALING, *delta, b), "w": w, "a": a, "b": lb, "delta": delta}


def check_op(op, in_f, out_f, batch, dtype, device) -> dict:
    ref, tri = kernels()
    case = build(op, in_f, out_f, dtype, device)
    x = torch.randn(batch, in_f, device=device).to(dtype)
    got = getattr(tri, op)(x, *case["args"])
    up = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in case["args"])
    exact = getattr(ref, op)(x.double(), *up)
    error = float((got.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30))
    return {"op": op, "in": in_f, "out": out_f, "batch": batch, "dtype": str(dtype).split(".")[-1],
            "max_rel_error": error, "tolerance": TOLERANCE[dtype], "ok": error <= TOLERANCE[dtype]}


def check_mezo(device, numel: int) -> list[dict]:
    """Same noise as the reference; +eps, -2eps, +eps returns to the start within rounding."""
    from compressor.kernels.dispatch import mezo_normal

    ref, tri = kernels()
    rows, z = [], mezo_normal(numel, 31337, 0, torch.float64, device)
    for dtype in (torch.float32, torch.bfloat16):
        case, start = {"dtype": str(dtype).split(".")[-1], "numel": numel}, torch.randn(numel, device=device).to(dtype)
        a, b = start.clone(), start.clone()
        ref.mezo_axpy_(a, 1234, 7, 0.5)
        tri.mezo_axpy_(b, 1234, 7, 0.5)
        # fp32: libm vs GPU log/cos differ by ulps; 16-bit: one rounding of nearly equal values
        diff = (a.double() - b.double()).abs()
        diff = float(diff.max() if dtype == torch.float32 else (diff / a.double().abs().clamp_min(1e-30)).max())
        allowed = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        drift = round_trip([start], kernel_loop)
        bound = 1.5 * torch.finfo(dtype).eps * (start.double().abs() + 2 * EPS * z.abs())
        rows += [{"op": "mezo_axpy_ vs ref", **case, "max_abs_diff": diff, "tolerance": allowed, "ok": diff <= allowed},
                 {"op": "mezo +e,-2e,+e drift", **case, "max_abs_diff": float(drift.max()),
                  "tolerance": float(bound.max()), "ok": bool((drift <= bound).all())}]
    return rows


def run_checks(device, mode: str) -> list[dict]:
    """The `mode`'s checks on (in, out, batch, dtypes) cases: ragged ones in every dtype, large ones in bf16."""
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    cases = {"cpu-smoke": [(40, 24, 1, (f32, bf16)), (72, 70, 37, (f32, bf16))],
             "quick": [(1000, 3000, 3, (bf16, f16, f32)), (520, 136, 77, (bf16, f16, f32)), (4096, 4096, 1, (bf16,))]}
    cases["full"] = cases["quick"] + [(4096, 11008, 16, (bf16,)), (11008, 4096, 512, (bf16,))]
    rows = [check_op(op, in_f, out_f, batch, dtype, device)
            for op, (in_f, out_f, batch, dtypes) in itertools.product(OPS, cases[mode]) for dtype in dtypes]
    return rows + check_mezo(device, 10_000 if mode == "cpu-smoke" else 3_000_001)


@dataclass
class Timer:
    """do_bench medians in microseconds; `copies` are cycled so L2 cannot hold the weights. A `dry`
    timer runs every timed callable once and returns NaN: it exercises the timing code on CPU."""

    quick: bool
    ceilings: dict = field(default_factory=dict)
    dry: bool = False

    def us(self, fn, copies: list[tuple], graph: bool = False) -> float:
        """`graph`: the mean of `fn` replayed in a CUDA graph instead (no launch overhead, as in a decode
        loop; triton's do_bench_cudagraph runs it once first, so autotuning stays outside the capture)."""
        import triton.testing

        if self.dry:
            fn(*copies[0])
            return float("nan")
        cycle = itertools.cycle(copies)
        if graph:
            return 1e3 * triton.testing.do_bench_cudagraph(lambda: fn(*next(cycle)))
        warmup, rep = (5, 20) if self.quick else (25, 100)
        return 1e3 * triton.testing.do_bench(lambda: fn(*next(cycle)), warmup=warmup, rep=rep, return_mode="median")


def copies_for(nbytes: float) -> int:
    return int(min(16, max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def measure_ceilings(timer: Timer, device) -> dict:
    src, dst = (torch.empty(int(2e9) // 2, dtype=torch.bfloat16, device=device) for _ in range(2))
    copy_us = timer.us(lambda: dst.copy_(src), [()])
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    gemm_us = timer.us(lambda: a @ b, [()])
    return {"copy_TBps": 2 * 2e9 / copy_us / 1e6, "gemm_TFLOPs": 2 * 8192**3 / gemm_us / 1e6}


def kernel_rows(in_f: int, out_f: int, batch: int) -> list[tuple]:
    """K1-K6 declared: (kernel, op, build keywords, baselines {name: (x, case) -> y}, bytes the kernel
    must move besides x and y, flops, extra row fields), bf16, no bias."""
    ref, _ = kernels()
    dense_bytes, dense_flops = 2 * in_f * out_f, 2 * batch * in_f * out_f
    packed_bytes = in_f * out_f * (1 + 0.125)  # bf16 values for half the entries + 2-bit indices
    k = max(4, in_f // 4 // 4 * 4)
    factor_bytes = 2 * out_f * k + in_f * k * 1.125
    lora_bytes, lora_flops = 2 * LORA_RANK * (in_f + out_f), 2 * batch * LORA_RANK * (in_f + out_f)
    rows = [("K1" if batch <= 16 else "K2", "low_rank_linear", {"keep": keep},
             {"two F.linear": lambda x, c: F.linear(F.linear(x, c["v"]), c["u"])},
             2 * r * (in_f + out_f) + 8 * batch * r, 2 * batch * r * (in_f + out_f), {"keep": keep, "rank": r})
            for keep in (0.5, 0.25) for r in [rank_for(keep, in_f, out_f)]]
    return rows + [
        ("K3", "nm_linear", {},
         {"torch 2:4": derived("t24", lambda c: torch.sparse.to_sparse_semi_structured(c["dense"]))},
         packed_bytes, dense_flops // 2, {}),
        ("K5", "dense_sparse_linear", {},
         {"merged dense": derived("merged", lambda c: c["d"] @ c["s"]),
          "unfused": lambda x, c: F.linear(F.linear(x, c["s"]), c["d"])},
         factor_bytes + 8 * batch * k, 2 * batch * k * (in_f // 2 + out_f),
         {"bytes_ratio": dense_bytes / factor_bytes}),
        ("K6", "lora_linear", {},
         {"base + separate LoRA": lambda x, c: F.linear(x, c["w"]) + SCALING * F.linear(F.linear(x, c["a"]), c["b"])},
         dense_bytes + lora_bytes + 2 * batch * in_f, dense_flops + lora_flops, {}),
        ("K4", "dsee_nm_linear", {},
         {"merged dense": derived("merged", merged_dsee),
          "unfused": lambda x, c: ref.dsee_linear(x, c["w"], c["a"], c["b"], SCALING, *c["delta"])},
         packed_bytes + lora_bytes + 18 * DSEE_NNZ + 2 * batch * in_f, dense_flops // 2 + lora_flops, {})]


def derived(key: str, make):
    """A baseline on a weight derived once per copy (torch's 2:4 form, a merged dense matrix)."""

    def run(x, c):
        if key not in c:
            c[key] = make(c)
        return F.linear(x, c[key])

    return run


def merged_dsee(c):
    return (c["w"] + SCALING * c["b"] @ c["a"]).index_put(c["delta"][:2], c["delta"][2], accumulate=True)


def bench_shape(timer: Timer, in_f: int, out_f: int, batch: int, device) -> list[dict]:
    """The dense row and every declared K1-K6 row for one weight shape and batch."""
    _, tri = kernels()
    x = torch.randn(batch, in_f, device=device).to(torch.bfloat16)
    io, dense_bytes = 2 * batch * (in_f + out_f), 2 * in_f * out_f
    dense_us = timer.us(lambda w: F.linear(x, w),  # the copies are freed when it returns
                        [(_w(out_f, in_f, torch.bfloat16, device),) for _ in range(copies_for(dense_bytes))])

    def row(kernel, op, us, nbytes, flops, baselines, **extra) -> dict:
        tbps, tflops = nbytes / us / 1e6, flops / us / 1e6
        return {"kernel": kernel, "op": op, "in": in_f, "out": out_f, "batch": batch, "us": us, "bytes": nbytes,
                "TBps": tbps, "pct_copy": 100 * tbps / timer.ceilings["copy_TBps"], "TFLOPs": tflops,
                "pct_gemm": 100 * tflops / timer.ceilings["gemm_TFLOPs"], "baselines_us": baselines,
                "speedup": {k: v / us for k, v in baselines.items()}, **extra}

    rows = [row("dense", "F.linear", dense_us, dense_bytes + io, 2 * batch * in_f * out_f, {})]
    for kernel, op, keywords, baselines, nbytes, flops, extra in kernel_rows(in_f, out_f, batch):
        cases = [(build(op, in_f, out_f, torch.bfloat16, device, bias=False, **keywords),)
                 for _ in range(copies_for(nbytes))]
        us = timer.us(lambda c, op=op: getattr(tri, op)(x, *c["args"]), cases)
        base, errors = {"dense F.linear": dense_us}, {}
        for name, baseline in baselines.items():
            try:  # a baseline that cannot run here (torch 2:4 on some GPUs) is a result too
                base[name] = timer.us(lambda c, f=baseline: f(x, c), cases)
            except Exception as error:  # noqa: BLE001
                errors[name] = f"{type(error).__name__}: {error}"[:200]
        rows.append(row(kernel, op, us, nbytes + io, flops, base, baseline_errors=errors, **extra))
    return rows


def bench_rows(timer, in_f, out_f, batch, device) -> list[dict]:
    """bench_shape with its targets; a shape that fails is recorded as an error row, not an abort."""
    try:
        rows = bench_shape(timer, in_f, out_f, batch, device)
    except Exception as error:  # noqa: BLE001 - report and continue with the next shape
        return [{"kernel": "error", "in": in_f, "out": out_f, "batch": batch,
                 "error": f"{type(error).__name__}: {error}"[:300]}]
    return [{**row, "targets": targets(row)} for row in rows]  # the dense row meets no target: []


def targets(row: dict) -> list[tuple[str, bool]]:
    """BENCHMARKS.md K targets that apply to this row, each with whether it was met."""
    k, b = row["kernel"], row["batch"]

    def faster(name: str, want: float) -> tuple[str, bool]:
        got = row["speedup"].get(name)  # None when that baseline failed to run
        return f">= {want:.2f}x {name}", got is not None and got >= want

    if k == "K1":
        return [("factor bytes >= 75 % of copy bandwidth", row["pct_copy"] >= 75),
                faster("dense F.linear", 0.8 / row["keep"])]
    if k == "K2":
        return [faster("two F.linear", 1.0)] + ([(">= 70 % of GEMM peak", row["pct_gemm"] >= 70)]
                                                if row["rank"] >= 512 else [])
    if k == "K3" and (b <= 16 or b >= 512):
        return [faster("dense F.linear", 1.4 if b <= 16 else 0.9)]
    if k == "K4" and b == 1:
        return [faster("merged dense", 1.5), faster("unfused", 1.3)]
    if k == "K5" and b <= 16:
        return [faster("merged dense", 0.8 * row["bytes_ratio"])]
    if k == "K6" and (b == 1 or b >= 512):
        limit, overhead = (0.15 if b == 1 else 0.05), 1 / row["speedup"]["dense F.linear"] - 1
        return [(f"<= {limit:.0%} over the base matmul (got {overhead:+.1%})", overhead <= limit)]
    return []


def layer_shapes(hidden: int = 4096, ffn: int = 11008) -> list[tuple[int, int]]:
    """(in, out) of a LLaMA-7B-shaped layer's linears: q, k, v, o, gate, up, down."""
    return [(hidden, hidden)] * 4 + [(hidden, ffn)] * 2 + [(ffn, hidden)]


def layer_views(flat: torch.Tensor, hidden: int, ffn: int) -> list[torch.Tensor]:
    """`flat` as layer-shaped tensors (q, k, v, o, gate, up, down repeated while they fit)."""
    views, used = [], 0
    for rows, cols in itertools.cycle(layer_shapes(hidden, ffn)):
        if used + rows * cols > flat.numel():
            return views
        views.append(flat[used: used + rows * cols].view(rows, cols))
        used += rows * cols


def torch_normal_loop(params, seed: int, scale: float) -> None:
    """The reference MeZO step: reset the RNG, draw z per tensor with torch.normal, add in place."""
    torch.manual_seed(seed)
    for p in params:
        p.add_(torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype), alpha=scale)


def kernel_loop(params, seed: int, scale: float) -> None:
    """The same step with the Triton kernel: one counter-based stream over all tensors."""
    for p, offset in zip(params, itertools.accumulate((p.numel() for p in params), initial=0)):
        kernels()[1].mezo_axpy_(p, seed, offset, scale)


def round_trip(params, step) -> torch.Tensor:
    """|theta - theta0| of every element (flat, fp64) after MeZO's +eps, -2eps, +eps with one seed,
    taken on copies of `params`."""
    moved = [p.clone() for p in params]
    for scale in (EPS, -2 * EPS, EPS):
        step(moved, 31337, scale)
    return torch.cat([(m.double() - p.double()).abs().flatten() for m, p in zip(moved, params, strict=True)])


def bench_mezo(timer: Timer, device, numel: int = 500_000_000, hidden=4096, ffn=11008) -> list[dict]:
    """K7 on a flat bf16 buffer (default 1e9 bytes) and on that memory as layer-shaped tensors."""
    flat = torch.randn(numel, device=device).to(torch.bfloat16)
    flat_us = timer.us(lambda: kernels()[1].mezo_axpy_(flat, 7, 0, 1e-3), [()])
    tbps = 2 * 2 * flat.numel() / flat_us / 1e6  # read + write
    params = layer_views(flat, hidden, ffn)
    loop_us = timer.us(lambda: kernel_loop(params, 7, 1e-3), [()])
    ref_us = timer.us(lambda: torch_normal_loop(params, 7, 1e-3), [()])
    ours, theirs = ({"max": float(d.max()), "mean": float(d.mean())}
                    for d in (round_trip(params, kernel_loop), round_trip(params, torch_normal_loop)))
    row = {"kernel": "K7", "op": "mezo_axpy_", "numel": flat.numel(), "us_flat": flat_us,
           "us_per_tensor_loop": loop_us, "us_torch_normal_loop": ref_us, "TBps": tbps,
           "pct_copy": 100 * tbps / timer.ceilings["copy_TBps"], "speedup_vs_torch_normal_loop": ref_us / loop_us,
           "drift": ours, "torch_drift": theirs}
    row["targets"] = [("flat update >= 80 % of copy bandwidth", row["pct_copy"] >= 80),
                      ("drift <= torch.normal loop's", ours["max"] <= theirs["max"])]
    return [row]


def decode(h, linear, weights):
    """One token through the stack: q, k, v, o chained, then the gated MLP (the linears are what E1 times)."""
    for q, k, v, o, gate, up, down in weights:
        h = linear(linear(linear(linear(h, q), k), v), o)
        h = linear(F.silu(linear(h, gate)) * linear(h, up), down)
    return h


def e1_decode(timer: Timer, device, layers: int = 32, hidden: int = 4096, ffn: int = 11008) -> dict:
    """ms/token of a decoder-shaped chain of linears at batch 1: dense vs low rank keep 0.6."""
    bf16, keep, shapes = torch.bfloat16, 0.6, layer_shapes(hidden, ffn)
    dense = [[_w(o, i, bf16, device) for i, o in shapes] for _ in range(layers)]
    factors = [[(_w(o, rank_for(keep, i, o), bf16, device), _w(rank_for(keep, i, o), i, bf16, device))
                for i, o in shapes] for _ in range(layers)]
    dense_bytes = sum(w.numel() * 2 for layer in dense for w in layer)
    factor_bytes = sum((u.numel() + v.numel()) * 2 for layer in factors for u, v in layer)
    x, ceil = torch.randn(1, hidden, device=device).to(bf16), timer.ceilings["copy_TBps"] * 1e12
    stacks = {"dense F.linear": (F.linear, dense),
              "low rank, Triton": (lambda h, uv: kernels()[1].low_rank_linear(h, *uv), factors),
              "low rank, two F.linear": (lambda h, uv: F.linear(F.linear(h, uv[1]), uv[0]), factors)}
    return {"layers": layers, "keep": keep, "dense_GB": dense_bytes / 1e9, "lowrank_GB": factor_bytes / 1e9,
            **{f"{name} ms/token": timer.us(decode, [(x, *stack)], graph=True) / 1e3 for name, stack in stacks.items()},
            "floor dense ms": dense_bytes / ceil * 1e3, "floor low rank ms": factor_bytes / ceil * 1e3}


CHECK_COLUMNS = [("op", "{op}"), ("shape / numel", lambda r: f"{r['in']}x{r['out']}" if "in" in r else r["numel"]),
                 ("batch", lambda r: r.get("batch", "")), ("dtype", "{dtype}"),
                 ("error", lambda r: f"{r.get('max_rel_error', r.get('max_abs_diff')):.2e}"),
                 ("tol", "{tolerance:.1e}"), ("ok", lambda r: "yes" if r["ok"] else "**NO**")]
TIMING_COLUMNS = [
    ("kernel", "{kernel}"), ("op", lambda r: r["op"] + (f" keep {r['keep']}" if "keep" in r else "")),
    ("in x out", "{in}x{out}"), ("batch", "{batch}"), ("us", "{us:.1f}"), ("TB/s", "{TBps:.2f}"),
    ("% copy", "{pct_copy:.0f}"), ("TFLOP/s", "{TFLOPs:.1f}"),
    ("speedups", lambda r: ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items()) + " " + "; ".join(
        f"{k}: {v}" for k, v in r.get("baseline_errors", {}).items())),
    ("targets", lambda r: ", ".join(f"{t} {'met' if ok else '**missed**'}" for t, ok in r.get("targets", [])))]


def cells(columns, row: dict) -> list:
    if row.get("kernel") == "error":  # a shape that failed: its message in the "us" column
        return ["error", "", f"{row['in']}x{row['out']}", row["batch"], row["error"], "", "", "", "", ""]
    return [cell.format(**row) if isinstance(cell, str) else cell(row) for _, cell in columns]


def spec_table(columns, rows: list[dict]) -> list[str]:
    return table([header for header, _ in columns], [cells(columns, r) for r in rows])


def render_markdown(report: dict) -> str:
    c, timed, e1 = report.get("ceilings"), report.get("timings"), report.get("e1")
    return markdown(
        "# Kernel benchmarks (BENCHMARKS.md K, E1)", " | ".join(f"{k}: {v}" for k, v in report["env"].items()),
        f"mode: {report['mode']}",
        c and f"Ceilings: copy {c['copy_TBps']:.2f} TB/s, bf16 GEMM {c['gemm_TFLOPs']:.0f} TFLOP/s",
        "## Correctness (max |y - y64| / max |y64|)", spec_table(CHECK_COLUMNS, report["checks"]),
        *(("## Kernels (bf16, in x out, us = do_bench median)", spec_table(TIMING_COLUMNS, timed)) if timed else ()),
        *(["## K7 MeZO", "", "```", json.dumps(r, indent=1, default=str), "```"] for r in report.get("mezo", [])),
        *(("## E1 decode, batch 1, CUDA graph",
           [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in e1.items()]) if e1 else ()))


def run_timings(report: dict, device, quick: bool, save) -> None:
    """Fills report["ceilings" / "timings" / "mezo" / "e1"], calling `save()` after each part."""
    timer = Timer(quick)
    timer.ceilings = report["ceilings"] = measure_ceilings(timer, device)
    report["timings"] = []
    for (in_f, out_f), batch in itertools.product([SHAPES[0], SHAPES[2]] if quick else SHAPES,
                                                  [1, 16, 4096] if quick else BATCHES):
        for row in bench_rows(timer, in_f, out_f, batch, device):
            report["timings"].append(row)
            print(" | ".join(map(str, cells(TIMING_COLUMNS, row))), flush=True)
        torch.cuda.empty_cache()
        save()
    report["mezo"] = bench_mezo(timer, device)
    torch.cuda.empty_cache()
    save()
    report["e1"] = e1_decode(timer, device)


def dry_run(device) -> dict:
    """Every timing path once on tiny shapes with no clock: catches plumbing errors off-GPU."""
    timer = Timer(quick=True, ceilings={"copy_TBps": float("nan"), "gemm_TFLOPs": float("nan")}, dry=True)
    rows = [row for batch in (1, 20) for row in bench_rows(timer, 64, 48, batch, device)]
    errors = [row["error"] for row in rows if row["kernel"] == "error"]
    errors += [f"{row['op']} / {name}: {e}" for row in rows for name, e in row.get("baseline_errors", {}).items()
               if name != "torch 2:4"]  # torch's 2:4 needs CUDA; on a GPU its failure is a result
    bench_mezo(timer, device, numel=3 * 64 * 96, hidden=64, ffn=96)
    e1_decode(timer, device, layers=2, hidden=64, ffn=96)
    print(f"dry run of the timing code: {len(rows)} rows, errors: {errors or 'none'}")
    return {"rows": len(rows), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__, threads=None)
    parser.add_argument("--quick", action="store_true",
                        help="two shapes, three batches, shorter timing windows (about 4 minutes on an H200)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="CPU, TRITON_INTERPRET=1: the checks at tiny shapes, every timing path once unclocked")
    args = parser.parse_args(argv)
    if args.render:
        return print(rerender(args.out, "kernels_gpu", render_markdown))
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of the Triton kernels
    elif not torch.cuda.is_available():
        sys.exit("error: kernels_gpu needs a CUDA device; use --cpu-smoke for the CPU correctness run")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    torch.manual_seed(0)
    mode = "cpu-smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
    saved = Report(args.out, "kernels_gpu", render_markdown)
    saved.state = report = {"env": environment(device), "mode": mode, "checks": run_checks(device, mode)}
    print("\n".join("check " + " | ".join(map(str, cells(CHECK_COLUMNS, c))) for c in report["checks"]))
    saved.write()
    failed = [c for c in report["checks"] if not c["ok"]]
    if args.cpu_smoke and not failed:
        report["dry_run"] = dry_run(device)
    elif not failed:
        run_timings(report, device, args.quick, save=saved.write)
    saved.write()
    print(f"kernels_gpu: wrote {Path(args.out) / 'kernels_gpu.json'} and kernels_gpu.md")
    return 1 if failed or report.get("dry_run", {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

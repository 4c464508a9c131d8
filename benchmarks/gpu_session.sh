#!/usr/bin/env bash
# One GPU session (issue 10 item 5): the K kernel table and the P3 decode table on CUDA, in under
# 7 minutes, each step under its own `timeout` so a hang in one does not lose the other's table.
#
#   bash benchmarks/gpu_session.sh [OUT]        # OUT defaults to $OUT, else ./gpu-session-out
#
# Needs python3 with torch, triton, transformers, safetensors (no gguf, no network). The package
# is made importable without pip: a folder of symlinks lays the repo out as the installed
# `compressor` package (compressor.cli -> cli/, compressor.kernels -> kernels/ via the compressor/kernels link) as pyproject's
# package-dir does) and goes on PYTHONPATH. Writes flat files into OUT (at most 8):
#   nvidia-smi.txt  kernels_gpu.{md,json}  decode_speed_cuda.{md,json}  session.log
#
# GPU_SESSION_CPU_CHECK=1 runs the same steps on CPU, tiny (kernels --cpu-smoke; one variant per
# kind of layer, 3 new tokens: all eight SmolLM2-sized variants took over the 180 s limit on 2 cores):
# a check that the script and its python steps start on a machine without a GPU.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-$PWD/gpu-session-out}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/session.log"
SHIM="$(mktemp -d)"
started=$SECONDS

say() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - started))s] $*" | tee -a "$LOG"; }

# -- compressor importable: symlinks, no install ------------------------------------------------
mkdir -p "$SHIM/compressor"
for entry in compressor/*; do ln -s "$PWD/$entry" "$SHIM/compressor/"; done
ln -s "$PWD/cli" "$SHIM/compressor/cli"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The first attempt (reports/gpu_session_attempt.log) spent both limits compiling autotune
# candidates: one launch config per kernel here (timings are then those of an untuned launch).
export COMPRESSOR_TRITON_AUTOTUNE="${COMPRESSOR_TRITON_AUTOTUNE:-0}"

say "gpu_session: out=$OUT_DIR"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1; say "nvidia-smi rc=$?"
cat "$OUT_DIR/nvidia-smi.txt" | head -20 | tee -a "$LOG"
(cd /tmp && python3 -c "import torch, triton, transformers, compressor.kernels.dispatch; print('torch', \
torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', \
torch.cuda.is_available())") 2>&1 | tee -a "$LOG"  # from /tmp: the repo's own compressor/ would shadow
if [ "${GPU_SESSION_CPU_CHECK:-0}" = 1 ]; then
  KERNEL_ARGS=(--cpu-smoke)
  DECODE_ARGS=(--device cpu --new-tokens 3 --repeats 1 --batches 1 --variants dense,lowrank-0.6,prune-2:4,int4)
else
  KERNEL_ARGS=(--quick); DECODE_ARGS=(--device cuda --repeats 2)
fi

# -- 1. K table: correctness first, then timings --------------------------------------------------
say "kernels_gpu ${KERNEL_ARGS[*]} (limit 200 s; the report is rewritten after each shape)"
timeout -k 10 200 python3 benchmarks/kernels_gpu.py "${KERNEL_ARGS[@]}" --out "$OUT_DIR" 2>&1 | tail -n 80 >> "$LOG"
say "kernels_gpu rc=${PIPESTATUS[0]}"

# -- 2. P3 decode on CUDA: random weights at SmolLM2's shapes (the GGUF cannot travel) ------------
say "decode_speed ${DECODE_ARGS[*]} (limit 180 s)"
timeout -k 10 180 python3 benchmarks/decode_speed.py "${DECODE_ARGS[@]}" \
  --random-init benchmarks/smollm2_135m_config.json --tag cuda --out "$OUT_DIR" \
  2>&1 | tail -n 60 >> "$LOG"
say "decode_speed rc=${PIPESTATUS[0]} (the report is rewritten after every decode)"

rm -rf "$SHIM"
say "done in $((SECONDS - started)) s; files:"
ls -la "$OUT_DIR" | tee -a "$LOG"

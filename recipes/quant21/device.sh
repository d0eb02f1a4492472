#!/usr/bin/env bash
# Issue 21 item 3 in ONE device call (one H200, at most 9.5 min wall clock, hard deadline inside): which int8 path
# is faster than bf16? benchmarks/quantize.py at Moshi-7B shape (random weights, bf16, TTT with own projections in
# all 32 layers, moshi's CUDA graphs, NO_TORCH_COMPILE=1 so only our quantized linears compile), each row in a
# process of its own (a failed CUDA graph capture poisons its process: on 2026-12-02 w8a8's lost every later row),
# each model timed at batch 1 then 64, ratios against the bf16 hybrid at the same batch. Rows, the ones that
# matter most first (docs/benchmarks.md "int8 that is not slower" says why):
#   bf16 hybrid (the reference);
#   int8triton: our Triton weight-only int8 kernel (src/ttt_speech/ops/int8/triton_mm.py: the codes read once and
#     converted in registers; at batch 1 the faster of a GEMV and tensor-core tiles, raced per shape; tiles at 64),
#     autotuned in the first (eager) step of each batch (its "to frame s" includes that): 0.973x / 0.98-1.03x on
#     2026-12-02, logit error 0.0430 (int8's 0.0436: it computes int8);
#   int8+compile (int8_linear, fp32 scale, torch.compile, moshi's gated MLPs routed too): 0.862x / 1.157x;
#   int8pack: torch._weight_int8pack_mm eager, the kernel inductor put into the morning's compiled row: 5.7x / 27x;
#   w8a8 eager: fails moshi's CUDA graph capture (torchao's safe_int_mm syncs inside it); int4+compile 0.847x / 1.73x.
#   (docs/benchmarks.md, 2026-12-02 12:32-12:45 UTC; the default rows still run them all.)
#   int8+autotune is not a default row any more: its max-autotune warm-up ran over 7 minutes.
# Before the rows (not with TINY=1), at most MM_SECONDS (default 75): benchmarks/int8_mm.py, our kernel alone against
# cuBLAS bf16 at every linear shape of the hybrid (µs, GB/s, the autotuned config; $OUT/quant21/int8_mm.md).
# Run from the repository root, carrying .whl (moshi 0.2.13 and torchao 0.18.0 py3-none-any wheels, ~1.5 MB;
# the device has neither; sphn is not needed here; triton comes with the device's torch):
#   run(command="bash recipes/quant21/device.sh", carry=[".whl"], timeout_s=600)
# Results in $OUT/quant21/: quantize.md (the table, one line per finished row, so rows finished before a cut
# come back), log.txt (the same with warnings and tracebacks, set-up time), gpu_checks.log (the gpu tests:
# tests/test_int8_triton.py, our kernel against its fp32 reference at Moshi-7B shapes and the int8triton model
# against int8, and tests/test_quantize.py's int4 tinygemm kernel against int4_round_trip, passed on the H200 on
# 2026-12-02), nvidia-smi.txt.
#
# Row times on 2026-12-02 (H200, one process): bf16 build 2.4 s, 6 s to frame 100 at batch 1 and 5.5 s at 64;
# int8 compiled 34 s to frame 100 at batch 1 and 69 s at 64 (inductor's warm-up); eager rows ~20 s in all.
# Each row's own process adds its imports and CUDA context (~5-10 s, not measured). int8triton's autotuning (4 GEMV
# and 6 tile configs at batch 1, then the two raced; 6 tile configs at 64; 11 weight shapes each, ~40 ms a timing,
# plus compiling ~16 kernels, most already in Triton's cache from int8_mm.py) is not measured: expected well under
# a minute per batch.
# After set-up (~15 s) and int8_mm.py (<= 75 s) the rows have ~385 s: nothing new starts after ~475 s (budget) and
# SIGINT comes at ~505 s (the row in progress stops, the finished ones are out), then the gpu checks (~60 s).
# w8a8 at batch 1 may fail or fall back (a result, printed as its row): cuBLAS's int8 GEMM behind torch._int_mm
# refuses fewer than 17 rows ("self.size(0) needs to be greater than 16").
# Compiled rows skip their logit pass (--logits eager: it would compile the teacher-forced shapes too); the
# eager row of the same mode gives the quantization's logit error.
#
# Knobs (env): DEADLINE (s, whole command, default 570), ROWS, BATCHES (default 1,64), LAYERS (default all),
# MM_SECONDS (int8_mm.py's share, default 75; 0 skips it), MM_ARGS (more int8_mm.py arguments: the next call's
# MM_SECONDS=200 MM_ARGS="--rows 64,16,1 --configs" ROWS=bf16,int8triton DEADLINE=420 times every tile config,
# graph-timed, docs/benchmarks.md).
# PROFILE (a comma list of batches, default none): before the rows, benchmarks/step_kernels.py at each, into
# $OUT/quant21/step_kernels_B.md: the step's kernels under moshi's CUDA graphs, and wall-clock vs GPU-busy per step
# with the models alternating PROFILE_ROUNDS times (default 2) in one process (docs/benchmarks.md: at batch 64 a
# model's wall clock moves by up to 4 ms with the process's history, its GPU time does not).
# TINY=1: the same steps at the tiny shape on the CPU in seconds, compiled rows through aot_eager, int8triton
# refused as its row (tests/test_quant_recipe.py; PYTHON picks the interpreter, nothing is installed).
set -uo pipefail
S0=$SECONDS
R=$OUT/quant21
DEADLINE=${DEADLINE:-570} PY=${PYTHON:-python3}
ROWS=${ROWS:-bf16,int8triton,int8+compile,int8pack,w8a8,int4+compile}
left() { echo $((DEADLINE - (SECONDS - S0))); }
mkdir -p "$R"
if [ "${TINY:-0}" = 1 ]; then
  SHAPE=(--tiny --batches "${BATCHES:-1,3}" --frames 4 --window 3 --backend aot_eager)
else
  SHAPE=(--batches "${BATCHES:-1,64}")
  WHEELS=$(ls .whl/moshi-*.whl .whl/torchao-*.whl 2>/dev/null)
  [ "$(echo "$WHEELS" | grep -c .)" = 2 ] || { echo "need the moshi and torchao wheels in .whl/: carry them (docs/benchmarks.md)"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $WHEELS || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv > "$R/nvidia-smi.txt"
fi
export NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-}:$PWD/benchmarks
echo "set-up $((SECONDS - S0)) s; $(left) s left; rows $ROWS" | tee "$R/log.txt"
if [ "${TINY:-0}" != 1 ] && [ "${MM_SECONDS:-75}" -gt 0 ]; then
  # first, at most MM_SECONDS: our int8 kernel alone against cuBLAS bf16 at every linear shape of the hybrid, batch
  # 1, 64, 4, 16 (what the int8triton row can gain at most, and which config autotuning picks; fills Triton's cache)
  timeout -k 5 "${MM_SECONDS:-75}" "$PY" benchmarks/int8_mm.py --seconds $((${MM_SECONDS:-75} - 20)) ${MM_ARGS:-} 2>&1 \
    | tee "$R/int8_mm.md"
  echo "int8_mm rc=${PIPESTATUS[0]} after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
fi
if [ -n "${PROFILE:-}" ]; then
  # where a step's GPU time goes, per batch in PROFILE: the step's kernels, unquantized and int8triton side by side,
  # alternating PROFILE_ROUNDS times (benchmarks/step_kernels.py), at most PROFILE_SECONDS (default 150) each
  for B in ${PROFILE//,/ }; do
    if [ "${TINY:-0}" = 1 ]; then KS=(--tiny --modes none,int8 --frames 4 --steps 2 --wall-steps 2); else KS=(--modes none,int8triton); fi
    timeout -k 5 "${PROFILE_SECONDS:-150}" "$PY" benchmarks/step_kernels.py "${KS[@]}" --batch "$B" \
      --rounds "${PROFILE_ROUNDS:-2}" --top 45 > "$R/step_kernels_$B.md" 2>> "$R/log.txt"
    echo "step_kernels batch $B rc=$? after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
  done
fi
# nothing new starts 95 s before the deadline; SIGINT 65 s before it: the row in progress stops, the finished ones
# are out; the last ~55 s check our int8 kernel and int4's against their references (the docs' int4 logit errors
# rest on the second)
timeout -k 10 -s INT $(($(left) - 65)) "$PY" benchmarks/quantize.py "${SHAPE[@]}" --rows "$ROWS" \
  --layers "${LAYERS:-all}" --logits eager --seconds $(($(left) - 95)) 2>&1 | tee -a "$R/log.txt"
echo "quantize rc=${PIPESTATUS[0]} after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
timeout -k 3 $(($(left) - 3)) "$PY" -m pytest -m gpu tests/test_quantize.py tests/test_int8_triton.py \
  -k "int8 or int4_kernel" -p no:cacheprovider -o addopts= -rfEs > "$R/gpu_checks.log" 2>&1
echo "gpu checks rc=$? after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
grep -E '^(device:|\||cut by|not run)' "$R/log.txt" > "$R/quantize.md"
ls -la "$R"

#!/usr/bin/env bash
# Issue 21 item 3 in ONE device call (one H200, at most 9.5 min wall clock, hard deadline inside): is int8 faster
# than bf16 once its matmul is fused? benchmarks/quantize.py at Moshi-7B shape (random weights, bf16, TTT with own
# projections in all 32 layers, moshi's CUDA graphs, NO_TORCH_COMPILE=1 so only our quantized linears compile), in
# one process, each model timed at batch 1 then 64, ratios against the bf16 hybrid at the same batch. Rows, the
# ones that matter most first:
#   bf16 hybrid (the reference), int8 compiled, w8a8 compiled, int4 (tinygemm: a fused kernel already),
#   int8 eager (the H100's 2.05x, now on the H200), w8a8 eager, int4 compiled.
# Run from the repository root, carrying .whl (moshi 0.2.13 and torchao 0.18.0 py3-none-any wheels, ~1.5 MB;
# the device has neither; sphn is not needed here):
#   run(command="bash recipes/quant21/device.sh", carry=[".whl"], timeout_s=600)
# Results in $OUT/quant21/: quantize.md (the table, one line per finished row, so rows finished before a cut
# come back), log.txt (the same with warnings and tracebacks, set-up time), int4_check.log (tests/test_quantize.py's
# gpu test: the tinygemm kernel equals int4_round_trip, the CPU reference of the docs' int4 logit errors),
# nvidia-smi.txt.
#
# Row time estimates (NOT measured; what dominates is set-up, not the timed frames). Timed frames: 150 steps
# per batch (100 to reach frame 100, 50 timed): ~4 s at batch 1 (H200 hybrid step ~26 ms, issue 21) and ~9 s
# at batch 64 (~61 ms). Set-up: ~30 s for the wheels, imports and CUDA; each row builds the 7B hybrid from
# seed 0 (~20-30 s: random init of 7.7B parameters on the GPU plus the TTT conversion; quantizing adds ~5 s)
# and its first step at each batch captures moshi's CUDA graphs (~2 s). A compiled row compiles one F.linear
# per distinct (input, weight) shape at each batch size, ~12 shapes, with torchao's inductor settings
# (coordinate-descent tuning): ~5-10 s each, so ~60-120 s per batch size and row, which is most of its time.
#   set-up                                                       ~30 s
#   bf16        build 25 + b1 6 + b64 11 + logits 2             ~45 s    ends ~75 s
#   int8+comp   build 30 + (compile 60-120 + time 6-11) x 2      150-290 s ends 225-365 s
#   w8a8+comp   the same                                         150-290 s ends 375-655 s
#   int4        build 35 + b1 6 + b64 11 + logits 2             ~55 s
#   int8, w8a8  eager, ~50 s each; int4+comp ~150-290 s
# Nothing new starts after ~505 s (budget) and SIGINT comes at ~535 s, then the int4 kernel check. So one call
# brings bf16 vs int8 compiled at both batches; w8a8 compiled at both only if compiling is at the fast end (else
# its batch-1 row, or nothing); int4 and the eager rows only then. The rest from a second call with ROWS naming
# them (the ratios need bf16 in every call):
#   run(command="ROWS=bf16,int4,int8,w8a8,int4+compile bash recipes/quant21/device.sh", carry=[".whl"],
#       timeout_s=600)
# w8a8 at batch 1 may fail or fall back (a result, printed as its row): cuBLAS's int8 GEMM behind torch._int_mm
# refuses fewer than 17 rows ("self.size(0) needs to be greater than 16"); torchao's eager path then catches it and
# multiplies in fp32, and compiled, inductor may pick that same aten kernel. w8a8's case is batch 64.
# Compiled rows skip their logit pass (--logits eager: it would compile the teacher-forced shapes too); the
# eager row of the same mode gives the quantization's logit error.
#
# Knobs (env): DEADLINE (s, whole command, default 570), ROWS, BATCHES (default 1,64), LAYERS (default all).
# TINY=1: the same steps at the tiny shape on the CPU in seconds, compiled rows through aot_eager
# (tests/test_quant_recipe.py; PYTHON picks the interpreter, nothing is installed).
set -uo pipefail
S0=$SECONDS
R=$OUT/quant21
DEADLINE=${DEADLINE:-570} PY=${PYTHON:-python3}
ROWS=${ROWS:-bf16,int8+compile,w8a8+compile,int4,int8,w8a8,int4+compile}
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
# nothing new starts 65 s before the deadline; SIGINT 35 s before it: the row in progress stops, the finished ones
# are out; the last ~25 s check int4's kernel against its CPU reference (the docs' int4 logit errors rest on it)
timeout -k 10 -s INT $(($(left) - 35)) "$PY" benchmarks/quantize.py "${SHAPE[@]}" --rows "$ROWS" \
  --layers "${LAYERS:-all}" --logits eager --seconds $(($(left) - 65)) 2>&1 | tee -a "$R/log.txt"
echo "quantize rc=${PIPESTATUS[0]} after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
timeout -k 3 $(($(left) - 3)) "$PY" -m pytest -m gpu tests/test_quantize.py -k int4_kernel -p no:cacheprovider \
  -o addopts= -rfEs > "$R/int4_check.log" 2>&1
echo "int4 kernel check rc=$? after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
grep -E '^(device:|\||cut by|not run)' "$R/log.txt" > "$R/quantize.md"
ls -la "$R"

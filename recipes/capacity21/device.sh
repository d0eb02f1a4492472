#!/usr/bin/env bash
# Issue 21 item 1 in ONE device call (one H200, at most 9.5 min wall clock, hard deadline inside): real-time
# sessions per GPU at Moshi-7B shape (random bf16 weights, fp32 Mimi, moshi's CUDA graphs, NO_TORCH_COMPILE=1),
# vanilla Moshi beside the capacity hybrid at attention windows 750, 1500 and 3000 frames, in that order (the
# rows that matter most first), through benchmarks/serve_capacity.py (docs/benchmarks.md, issue 21 section).
# Run from the repository root, carrying .whl (moshi 0.2.13 and sphn 0.2.0 cp312 wheels; ~19 MB, with the
# ~28 MB repo under the 64 MiB carry; sphn only times the host's Opus, a missing one skips that line):
#   run(command="bash recipes/capacity21/device.sh", carry=[".whl"], timeout_s=600)
# Results in $OUT/capacity21/: capacity.json and capacity.md (rewritten after every session count, so rows
# finished before a cut-off come back), capacity.png (after every row), log.txt, nvidia-smi.txt, opus_pool.md.
#
# The hybrid (HYBRID, named explicitly: convert-moshi's default branch is in-place in all 32 layers, 5754 MiB
# of state per session at 7B, 4x vanilla's KV cache: it cannot win on capacity): TTT-Linear reading the
# attention's own q/k/v in all 32 layers ("all:shared"): 129 MiB of fixed state per session and 1.048x
# vanilla's ms/frame at batch 1 (docs/benchmarks.md). At window 750 a session holds 375 MiB of KV + 129 MiB
# + ~16 MiB of Mimi and offsets = ~0.51 GiB against vanilla's 1.48 GiB: ~240 fit in the ~124 GiB left beside
# the weights, vanilla ~83. In-place on layers 28-31 (719 MiB per session: ~1.1 GiB at 750, ~110 fit) is the
# runner-up (HYBRID=28-31:inplace).
#
# Row time estimates (not measured). Step model from issue 21's H200 table: server step p90 22.4 ms + 0.45 ms
# per vanilla session, of which ~0.33 ms reads the session's 1.57 GB of KV at ~4.8 TB/s; a shared-hybrid session
# at window W then costs ~0.12 + 0.33 x W/3000 + 0.06 ms (its TTT state read and written); memory caps ~83 /
# 240 / 140 / 77 sessions. Replayed through the ramp's own search and budgets by recipes/capacity21/plan.py
# (~40 s of set-up first; 4 s / 10 s per count outside its timed frames, unknown until measured):
#   vanilla  probes 1,32,64,128 (refused: memory),96 (refused),80,88 (refused); confirms 80   133 s / 163 s
#   750      probes 1,32,64,128,192,256 (over),224 (over),208 (over); confirms 192         180 s / 228 s
#   1500     probes 1,32,64,128,192 (refused),160 (refused),144 (refused); confirms 128   149 s / cut
#   3000     cut by the deadline after its batch-1 probe                                   8 s / 14 s
# all done by 510 s / 459 s of the 570.
# So one call is expected to bring vanilla, 750 and likely 1500; the rest comes from a second call that appends
# to the first's table (copy capacity.json into a git-ignored carried folder; first plan it on the CPU with the
# step and set-up times just measured: python recipes/capacity21/plan.py --from .cap21/capacity.json
# --models 1500,3000 --row-seconds 240,240):
#   echo /.cap21/ >> .git/info/exclude; mkdir -p .cap21; cp <files_at>/capacity21/capacity.json .cap21/
#   run(command="MODELS=1500,3000 ROW_S=240,240 PREV=.cap21/capacity.json bash recipes/capacity21/device.sh",
#       carry=[".whl", ".cap21"], timeout_s=600)
# (a row already in PREV is replaced when measured again). Each row stops probing where its 1500-frame
# confirmation would not end inside its budget (capacity.search's deadline), and the table says so. int8 (item 3:
# benchmarks/quantize.py --compile, batch 1 and 64) does not fit beside these rows: its own call.
# Then, with >= 45 s left, the host's Opus over worker processes (benchmarks/opus_pool.py): CPU only, the
# device host's per-core figure that bounds the server beside the GPU.
#
# Knobs (env): DEADLINE (s, whole command, default 570), MODELS (default vanilla,750,1500,3000), WINDOWS,
# HYBRID, COUNTS, ROW_S (row budgets in s, in the order rows run; "" none), PREV, OPUS_WORKERS ("" skips opus_pool),
# QUANTIZE (a --quantize mode for every row, e.g. int8triton: carry the torchao wheel in .whl/ too).
# TINY=1: the same steps with the tiny CPU models in seconds (tests/test_capacity_recipe.py; PYTHON picks the
# interpreter, nothing is installed).
set -uo pipefail
S0=$SECONDS
R=$OUT/capacity21
DEADLINE=${DEADLINE:-570} PY=${PYTHON:-python3}
left() { echo $((DEADLINE - (SECONDS - S0))); }
mkdir -p "$R"
if [ "${TINY:-0}" = 1 ]; then
  WINDOWS=${WINDOWS:-6,12,24} MODELS=${MODELS:-vanilla,6,12,24} OPUS_WORKERS=${OPUS_WORKERS-0,1}
  SHAPE=(--tiny --counts "${COUNTS:-1,2,4}" --frames "${FRAMES:-6}" --probe-frames 3 --warmup 1)
  OPUS=(--frames 3 --sessions-per-worker 2 --rounds 1)
else
  WINDOWS=${WINDOWS:-750,1500,3000} MODELS=${MODELS:-vanilla,750,1500,3000} OPUS_WORKERS=${OPUS_WORKERS-0,4,8,14}
  SHAPE=(${COUNTS:+--counts "$COUNTS"})
  OPUS=(--frames 50 --rounds 1)
  MOSHI=$(ls .whl/moshi-*.whl .exp24/whl/moshi-*.whl 2>/dev/null | head -1)
  [ -n "$MOSHI" ] || { echo "no moshi wheel in .whl/ or .exp24/whl/: carry one (docs/benchmarks.md)"; exit 1; }
  AO=$([ -n "${QUANTIZE:-}" ] && ls .whl/torchao-*.whl 2>/dev/null | head -1)
  [ -z "${QUANTIZE:-}" ] || [ -n "$AO" ] || { echo "QUANTIZE needs the torchao wheel in .whl/: carry it"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$MOSHI" $AO \
    $(ls .whl/sphn-*.whl 2>/dev/null) || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv > "$R/nvidia-smi.txt"
fi
export NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
APPEND=() ROWS=()
[ -n "${ROW_S-180,300}" ] && ROWS=(--row-seconds "${ROW_S-180,300}")
if [ -n "${PREV:-}" ]; then cp "$PREV" "$R/capacity.json" && APPEND=(--append); fi
echo "set-up $((SECONDS - S0)) s; $(left) s left" | tee "$R/log.txt"
# SIGINT at the deadline: the row in progress ends with its counts so far already written
timeout -k 10 -s INT $(($(left) - 10)) "$PY" benchmarks/serve_capacity.py "${SHAPE[@]}" --out "$R" \
  --windows "$WINDOWS" --models "$MODELS" --hybrid "${HYBRID:-all:shared}" --seconds $(($(left) - 25)) \
  ${QUANTIZE:+--quantize "$QUANTIZE"} \
  "${ROWS[@]}" "${APPEND[@]}" 2>&1 | tee -a "$R/log.txt"
echo "serve_capacity rc=${PIPESTATUS[0]} after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
if [ -n "$OPUS_WORKERS" ] && [ "$(left)" -ge 45 ]; then
  timeout -k 5 $(($(left) - 5)) "$PY" benchmarks/opus_pool.py --workers "$OPUS_WORKERS" "${OPUS[@]}" \
    > "$R/opus_pool.md" 2>&1
  echo "opus_pool rc=$? after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
fi
ls -la "$R"

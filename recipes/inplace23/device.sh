#!/usr/bin/env bash
# Issue 23 item 5, ONE device call (one H200, at most 4 min wall clock including CUDA warm-up): the in-place
# hybrid at Moshi-7B shape beside vanilla Moshi (benchmarks/inplace_stream.py; docs/benchmarks.md says what it
# measures). Run from the repository root, carrying .exp24 (its whl/ holds moshi 0.2.13; recipes/evidence.sh
# step 8 builds it), e.g. run(command="bash recipes/inplace23/device.sh", carry=[".exp24"], timeout_s=240).
# Results land in $OUT/inplace23/: inplace_stream.json and .md (rewritten after every part, so a run cut by
# the timeout keeps what it measured), log.txt, nvidia-smi.txt.
# Budget knobs (env): LAYERS ("all 28-31": one hybrid per entry), FRAMES (CUDA-graph frames timed per model;
# 384 = 6 chunk-end frames at chunk 64), EAGER (eager frames), WARMUP, CHUNK, TRAIN_T ("0" skips training),
# LIMIT (seconds the benchmark may run before it is stopped).
set -uo pipefail
S0=$SECONDS
B=${B:-$PWD/.exp24} R=$OUT/inplace23
mkdir -p "$R"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$B"/whl/moshi-*.whl || exit 1
# torch.compile off: moshi's lazily compiled kernels would spend the budget compiling (both models alike)
export PYTHONPATH=/tmp/site:$PWD/src NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv | tee "$R/nvidia-smi.txt"
echo "setup $((SECONDS - S0)) s" | tee "$R/log.txt"
timeout "${LIMIT:-$((220 - (SECONDS - S0)))}" python3 benchmarks/inplace_stream.py --layers ${LAYERS:-all 28-31} \
  --chunk "${CHUNK:-64}" --frames "${FRAMES:-384}" --eager-frames "${EAGER:-192}" --warmup "${WARMUP:-8}" --rounds 4 \
  --train-T ${TRAIN_T:-4096} --out "$R" 2>&1 | tee -a "$R/log.txt"
echo "benchmark rc=${PIPESTATUS[0]} after $((SECONDS - S0)) s" | tee -a "$R/log.txt"
ls -la "$R"

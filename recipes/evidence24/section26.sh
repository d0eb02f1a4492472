#!/usr/bin/env bash
# Issue 24, docs/results.md section 26's training (call 2, after section24.sh's data in /tmp/w/tok and /tmp/r/tok):
# section 24's BM (FROM: .exp24/bm/arm_b/export) continued in two arms side by side on one GPU, one data order:
#   bl  2048-frame sequences, 32 a batch (the same frames per step), far copies up to 1000 frames back, so training
#       asks for recall at the 640-frame gap that is scored (at 1024 frames no far copy reached past ~500);
#   bn  BM's own settings (1024 frames, 64 a batch, far copies 96-700 within 512-frame blocks): more steps alone.
#   bash recipes/evidence24/section26.sh
# Knobs: ARMS26 (the arms to run, "bl bn"; "bl" alone has the GPU to itself), DEADLINE (540 s), FROM (.exp24/bm;
# section 26's amendment: /tmp/ship, the shipped model, made by the caller), MIX (/tmp/r/tok/train), KEEPSTEP, and
# BLSET / BNSET, each arm's arms.sh settings (a CPU smoke test shrinks them; arms.sh's other knobs, e.g. STEPS, W,
# CEVERY, pass through).
# Each arm is arms.sh with its own SEQ/SEGMENT/BATCH/FAR (arms.sh takes one of each per call, so two run at once);
# $OUT gets one tar in 15 MiB parts (the device brings back at most 8 files a call, 16 MiB each): logs, metrics,
# and each arm's last export and that of step KEEPSTEP (default 1300), bf16, without the codec.
set -uo pipefail
X=$(dirname "$0") DEADLINE=${DEADLINE:-540} FROM=${FROM:-.exp24/bm} KEEPSTEP=${KEEPSTEP:-1300} MIX=${MIX:-/tmp/r/tok/train}
BLSET=${BLSET:-SEQ=2048 SEGMENT=2048 BATCH=32 FAR=96,1000} BNSET=${BNSET:-SEQ=1024 SEGMENT=1024 BATCH=64}
FINAL=$OUT
common() {
  env ARMS=$1 FROM=$FROM MIX=$MIX GAPS=96,640 PROBES=8 LR=3e-4 MEMLR=10 WARMUP=0.001 FARLEN=16,320 \
    FARBLOCKS=random DEADLINE=$DEADLINE PHASE=train KEEP=$1 CKEEP=40 KEEPSTEPS=$KEEPSTEP OUT=$FINAL/$1 "${@:2}" \
    bash "$X/arms.sh" > "$FINAL/$1.out" 2>&1
}
ARMS26=(${ARMS26:-bl bn})
for arm in "${ARMS26[@]}"; do
  set=${arm^^}SET
  mkdir -p "$FINAL/$arm" && common "$arm" ${!set} &
  sleep 10  # two arms.sh would install moshi into /tmp/site at the same moment
done
wait
cd "$FINAL" && for arm in "${ARMS26[@]}"; do tail -n 4 $arm.out; done
# the device brings back files of at most 16 MiB (one arm's two exports are ~29 MB): `cat section26.tar.* | tar x`
tar cf - "${ARMS26[@]}" "${ARMS26[@]/%/.out}" | split -b 15M -d -a 1 - section26.tar. \
  && rm -rf /tmp/s26 && mkdir /tmp/s26 && mv "${ARMS26[@]}" "${ARMS26[@]/%/.out}" /tmp/s26/ && ls -la
# kept on the machine for eval26.sh in the next call: /tmp/s26/ARM/export_ARM and /tmp/s26/ARM/export_ARM_KEEPSTEP

#!/usr/bin/env bash
# Issue 24, docs/results.md section 26's training (call 2, after section24.sh's data in /tmp/w/tok and /tmp/r/tok):
# section 24's BM (FROM: .exp24/bm/arm_b/export) continued in two arms side by side on one GPU, one data order:
#   bl  2048-frame sequences, 32 a batch (the same frames per step), far copies up to 1000 frames back, so training
#       asks for recall at the 640-frame gap that is scored (at 1024 frames no far copy reached past ~500);
#   bn  BM's own settings (1024 frames, 64 a batch, far copies 96-700 within 512-frame blocks): more steps alone.
#   bash recipes/evidence24/section26.sh
# Knobs: DEADLINE (540 s), FROM (.exp24/bm), MIX (/tmp/r/tok/train), KEEPSTEP, and BLSET / BNSET, each arm's arms.sh
# settings (a CPU smoke test shrinks them; arms.sh's other knobs, e.g. STEPS, W, CEVERY, pass through).
# Each arm is arms.sh with its own SEQ/SEGMENT/BATCH/FAR (arms.sh takes one of each per call, so two run at once);
# $OUT gets one tar (the device brings back only a few files a call): logs, metrics, and each arm's last export and
# that of step KEEPSTEP (default 1300), bf16, without the codec.
set -uo pipefail
X=$(dirname "$0") DEADLINE=${DEADLINE:-540} FROM=${FROM:-.exp24/bm} KEEPSTEP=${KEEPSTEP:-1300} MIX=${MIX:-/tmp/r/tok/train}
BLSET=${BLSET:-SEQ=2048 SEGMENT=2048 BATCH=32 FAR=96,1000} BNSET=${BNSET:-SEQ=1024 SEGMENT=1024 BATCH=64}
FINAL=$OUT
common() {
  env ARMS=$1 FROM=$FROM MIX=$MIX GAPS=96,640 PROBES=8 LR=3e-4 MEMLR=10 WARMUP=0.001 FARLEN=16,320 \
    FARBLOCKS=random DEADLINE=$DEADLINE PHASE=train KEEP=$1 CKEEP=40 KEEPSTEPS=$KEEPSTEP OUT=$FINAL/$1 "${@:2}" \
    bash "$X/arms.sh" > "$FINAL/$1.out" 2>&1
}
mkdir -p "$FINAL/bl" "$FINAL/bn"
common bl $BLSET &
sleep 10  # the two arms.sh would install moshi into /tmp/site at the same moment
common bn $BNSET &
wait
tail -n 4 "$FINAL"/bl.out "$FINAL"/bn.out
cd "$FINAL" && tar cf section26.tar bl bn bl.out bn.out && rm -rf bl bn bl.out bn.out && ls -la

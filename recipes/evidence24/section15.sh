#!/usr/bin/env bash
# Issue 24, section 15 as amended (docs/results.md, 2026-12-02 14:15 UTC): the base rebuilt (device1.sh, from the
# CPU-made token pack in .exp24/arms/pack.tar.xz when it is there), then arms BD / BQ / BO side by side from it,
# each stopped at 1092 steps, in three calls on one warm H200 (carry .exp24/whl and .exp24/arms; without the
# pack, carry .exp24 and run ARMS="bd bo": device1.sh then synthesizes the corpus on the device):
#   bash recipes/evidence24/section15.sh 1   # the base (~430 s), then the arms' first steps
#   bash recipes/evidence24/section15.sh 2   # the arms (the base first, if call 1 could not finish it)
#   bash recipes/evidence24/section15.sh 3   # the arms to their 1092 steps, exported (bf16, to $OUT) and scored
# ARMS="bd bo" runs two of them (the amendment's fallback when the device time cannot hold three).
set -uo pipefail
export ARMS=${ARMS:-bd bq bo} DECAY=0.9 RARE="bq=0.25" OWN=bo FARLEN=16,320 FARBLOCKS=random LR=3e-4 MEMLR=10 \
  STEPS=1092 WARMUP=0.0915 BASE=/tmp/w/base_bf16
export DECAYED=$ARMS
S0=$SECONDS
case ${1:?call 1, 2 or 3} in
  1) END=450 bash recipes/evidence24/device1.sh; [ -d $BASE ] || exit 1
     DEADLINE=$((590 - (SECONDS - S0))) PHASE=train bash recipes/evidence24/arms.sh ;;
  2) [ -d $BASE ] || END=250 bash recipes/evidence24/device1.sh; [ -d $BASE ] || exit 1
     DEADLINE=$((540 - (SECONDS - S0))) PHASE=train bash recipes/evidence24/arms.sh ;;
  3) DEADLINE=330 PHASE=all PROBES=30 GAPS=96,640 LENGTHS=64,1024,4096,8192 END=575 EVBATCH=360 KEEP="$ARMS" \
       bash recipes/evidence24/arms.sh ;;
  *) echo "section15.sh: call must be 1, 2 or 3, got $1" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Issue 24, section 15 as amended (docs/results.md, 2026-12-02 14:15 UTC): the base rebuilt (device1.sh, from the
# CPU-made token pack in .exp24/arms/pack.tar.xz when it is there), then arms BD / BQ / BO side by side from it,
# each stopped at 1092 steps, in three calls on one warm H200 (~1600 s of the 1800-s lease, start included;
# carry .exp24/whl and .exp24/arms; without the pack, carry .exp24 and run ARMS="bd bo": device1.sh then synthesizes the corpus on the device):
#   bash recipes/evidence24/section15.sh 1   # the base (~430 s), then the arms' first steps
#   bash recipes/evidence24/section15.sh 2   # the arms (the base first, if call 1 could not finish it)
#   bash recipes/evidence24/section15.sh 3   # the arms to their 1092 steps, exported (bf16, to $OUT) and scored
# ARMS="bd bo" runs two of them (the amendment's fallback when the device time cannot hold three).
set -uo pipefail
export ARMS=${ARMS:-bd bq bo} DECAY=0.9 RARE="bq=0.25" OWN=bo FARLEN=16,320 FARBLOCKS=random LR=3e-4 MEMLR=10 \
  STEPS=1092 WARMUP=0.0915 BASE=/tmp/w/base_bf16
export DECAYED=$ARMS
S0=$SECONDS
# CALL_END (seconds) ends a call; call 3's arms train until TRAIN_END, then export and score until CALL_END
# (set both from the device time left: a call that outlives the lease returns nothing).
case ${1:?call 1, 2 or 3} in
  1) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .exp24/whl/*.whl
     mkdir -p /tmp/w; rm -f /tmp/w/own_nograph
     # train.own_prefix samples with moshi's CUDA-graphed LMGen inside the training loop: checked on the GPU first,
     # beside the base's warm-up; if only NO_CUDA_GRAPH=1 passes, the own-prefix arms run without graphs
     (ck() { env "$@" PYTHONPATH=/tmp/site:$PWD/src NO_TORCH_COMPILE=1 python3 -m pytest -m gpu -p no:cacheprovider \
          -o addopts= -rfE tests/test_train_own_prefix.py; }
      ck >> /tmp/w/own_check.log 2>&1 || { ck NO_CUDA_GRAPH=1 >> /tmp/w/own_check.log 2>&1 && touch /tmp/w/own_nograph; }
      cp /tmp/w/own_check.log $OUT/) &
     END=450 bash recipes/evidence24/device1.sh; [ -d $BASE ] || exit 1
     wait; tail -3 /tmp/w/own_check.log; ls /tmp/w/own_nograph 2>/dev/null
     DEADLINE=$((${CALL_END:-570} - (SECONDS - S0))) PHASE=train bash recipes/evidence24/arms.sh ;;
  2) [ -d $BASE ] || END=250 bash recipes/evidence24/device1.sh; [ -d $BASE ] || exit 1
     # the arms' last checkpoints come back (bf16): 2026-12-02's machine went back before call 3 and took them
     DEADLINE=$((${CALL_END:-500} - (SECONDS - S0))) PHASE=train KEEP="$ARMS" bash recipes/evidence24/arms.sh ;;
  3) DEADLINE=${TRAIN_END:-280} PHASE=all PROBES=30 GAPS=96,640 LENGTHS=64,1024,4096,8192 END=${CALL_END:-520} \
       EVBATCH=360 KEEP="$ARMS" bash recipes/evidence24/arms.sh ;;
  *) echo "section15.sh: call must be 1, 2 or 3, got $1" >&2; exit 2 ;;
esac

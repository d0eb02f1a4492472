#!/usr/bin/env bash
# Issue 24: the go checks of docs/results.md sections 24-26 for exported models, on the device's GPU in one call
# (section 25 ran them there one call each: ~4 minutes in all for two models), packed into one tar in $OUT
# (in 15 MiB parts: `cat eval26.tar.* | tar x`).
#   bash recipes/evidence24/eval26.sh NAME=EXPORT_DIR [NAME=EXPORT_DIR ...]
# EVAL: a directory with clean5/ (held-out KJV readings none of whose sentences any of these models trained on),
# read10/ (section 10's 12 held-out readings less the two in section 24's training readings) and tok_reading/
# (free runs' prompt), as evalsets.sh writes them (section 25 kept them in .exp24/evaldata); W: the dialogues
# (section24.sh's /tmp/w).
#   1. criterion 1: eval-long's copy probes on clean5, all models in one run (the same probes), both controls;
#   2. criterion 2: 10-minute free runs after a reading, the user silent, seeds 0-2 (free_runs.sh, all at once on
#      DEVICE, default the GPU, so not the CPU's streams: section 25 ran both);
#   4. criterion 4: dialogue_memory.py QUOTES=0 on the held-out dialogues (memory as trained and lambda ~0);
#   5. criterion 5: eval-long's text loss by position on read10.
# Criterion 3 (duplex_free_runs.py, a user talking) runs on the CPU: ~5 minutes a seed there. Knobs: T (each
# job's timeout, 400 s), MINUTES (the free runs', 10), DEVICE (a CPU smoke test shortens them, DEVICE=cpu) and SWEEP
# (more copy gaps, scored by a job of their own into sweep/, so criterion 1's never waits on them; section 29:
# section 25's 320,480,800,960).
set -uo pipefail
X=$(dirname "$0") EVAL=${EVAL:-.exp24/evaldata} W=${W:-/tmp/w} T=${T:-400} E=/tmp/eval26 MINUTES=${MINUTES:-10}
DEVICE=${DEVICE:-cuda} SWEEP=${SWEEP:-}
export PYTHONPATH=/tmp/site:$PWD/src NO_TORCH_COMPILE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf $E && mkdir -p $E
MODELS=() EV="--baseline-length 64 --minutes 0 --no-progress --segment 2048"
for spec in "$@"; do
  name=${spec%%=*} dir=${spec#*=}
  MODELS+=(--model "$spec")
  QUOTES=0 timeout $T python3 $X/dialogue_memory.py "$dir" $W/tok/val $W/c > $E/dialogue_$name.log 2>&1 &
  timeout $T python3 -m ttt_speech eval-long --model "$spec" --data $EVAL/read10 --lengths 64,4096 $EV \
    --out $E/read10_$name > $E/read10_$name.log 2>&1 &
done
DEVICE=$DEVICE JOBS=$((3 * $#)) DATA=$EVAL/tok_reading MINUTES=$MINUTES timeout $T bash $X/free_runs.sh $E/fr "$@" \
  > $E/fr.log 2>&1 &
copies() {  # GAPS NAME: eval-long's copy probes on clean5 at those gaps, all models in one run, into $E/NAME
  timeout $T python3 -m ttt_speech eval-long "${MODELS[@]}" --data $EVAL/clean5 --lengths 64 --copy-gaps $1 \
    --copy-span 32 --copy-probes 20 --copy-context 64 --copy-controls $EV --out $E/$2 > $E/$2.log 2>&1
}
[ -n "$SWEEP" ] && copies $SWEEP sweep &
copies 96,640 clean5 &
wait
rm -rf $E/fr/model_*
cat $E/fr.log; grep -h "text loss by position" $E/dialogue_*.log; grep -A4 "^| text words" $E/clean5/report.md
[ -n "$SWEEP" ] && grep -A4 "^| text words" $E/sweep/report.md
cd $E && tar cf - . | split -b 15M -d -a 1 - $OUT/eval26.tar. && ls -la $OUT  # files of <= 16 MiB come back

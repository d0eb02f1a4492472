#!/usr/bin/env bash
# Issue 24's corpus (docs/results.md section 6): three make-corpus runs over texts that no other run reads, side by
# side, into OUT/c/{kjv,jargon,devil} (logs OUT/c_*.log); exit 1 if any failed.
#   bash recipes/evidence24/corpora.sh OUT TEXTS      TEXTS: the paragraphs' JSON (texts24.py dump); flite on the PATH
# JOBS: synthesis processes of each run (default "10 3 2": the device's 16 cores; "2 1 1" on 2 cores); RECS: its
# readings (default "140 36 12"), MINUTES (default 20) each. device1.sh and recipes/evidence.sh (step 8) call it.
set -uo pipefail
OUT=$1 TEXTS=$2 X=$(dirname "$0")
J=(${JOBS:-10 3 2}) N=(${RECS:-140 36 12})
MC="python3 $X/texts24.py run $TEXTS make-corpus --dialogues 0 --minutes-per-recording ${MINUTES:-20} --no-progress
  --voices flite:slt,flite:awb,flite:rms,flite:kal16,flite:kal"
$MC --out $OUT/c/kjv --texts kjv --recordings ${N[0]} --val-fraction 0.05 --seed 0 --jobs ${J[0]} > $OUT/c_kjv.log 2>&1 &
P1=$!
$MC --out $OUT/c/jargon --texts jargon --recordings ${N[1]} --val-fraction 0.06 --seed 1 --jobs ${J[1]} > $OUT/c_jargon.log 2>&1 &
P2=$!
$MC --out $OUT/c/devil --texts devil --recordings ${N[2]} --val-fraction 0.09 --seed 2 --jobs ${J[2]} > $OUT/c_devil.log 2>&1 &
P3=$!
rc=0; for p in $P1 $P2 $P3; do wait $p || rc=1; done; exit $rc

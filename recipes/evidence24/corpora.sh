#!/usr/bin/env bash
# Issue 24's corpus (docs/results.md section 6): three make-corpus runs over texts that no other run reads, side by
# side, into OUT/c/{kjv,jargon,devil} (logs OUT/c_*.log); exit 1 if any failed.
#   bash recipes/evidence24/corpora.sh OUT TEXTS      TEXTS: the paragraphs' JSON (texts24.py dump); flite on the PATH
# JOBS: synthesis processes of each run (default "10 3 2": the device's 16 cores; "2 1 1" on 2 cores); RECS: its
# readings (default "140 36 12"), MINUTES (default 20) each. device1.sh and recipes/evidence.sh (step 8) call it;
# evalsets.sh sources it for `readings` (one text's run, more make-corpus arguments after the first four).
set -uo pipefail
readings() {  # TEXT RECORDINGS JOBS OUT [make-corpus arguments...]: that text's run with its seed and held-out share
  local -A seed=([kjv]=0 [jargon]=1 [devil]=2) val=([kjv]=0.05 [jargon]=0.06 [devil]=0.09)
  python3 "$X/texts24.py" run "$TEXTS" make-corpus --dialogues 0 --minutes-per-recording "${MINUTES:-20}" \
    --no-progress --voices flite:slt,flite:awb,flite:rms,flite:kal16,flite:kal --texts "$1" --recordings "$2" \
    --jobs "$3" --out "$4" --val-fraction "${val[$1]}" --seed "${seed[$1]}" "${@:5}"
}
OUT=$1 TEXTS=$2 X=$(dirname "${BASH_SOURCE[0]}")
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0
J=(${JOBS:-10 3 2}) N=(${RECS:-140 36 12})
readings kjv "${N[0]}" "${J[0]}" "$OUT/c/kjv" > "$OUT/c_kjv.log" 2>&1 &
P1=$!
readings jargon "${N[1]}" "${J[1]}" "$OUT/c/jargon" > "$OUT/c_jargon.log" 2>&1 &
P2=$!
readings devil "${N[2]}" "${J[2]}" "$OUT/c/devil" > "$OUT/c_devil.log" 2>&1 &
P3=$!
rc=0; for p in $P1 $P2 $P3; do wait $p || rc=1; done; exit $rc

#!/usr/bin/env bash
# Issue 24's scoring sets rebuilt from their corpora's plans (make-corpus --only: just these recordings, byte for byte
# as the whole corpus has them), tokenized with the shipped codec, into OUT/{clean5,read10,tok_reading}, what
# eval26.sh takes as EVAL (the files do not outlive a session: every set here comes back from the texts alone):
#   clean5       section 6's held-out KJV readings none of whose sentences BC or BM trained on (section 25);
#   read10       section 6's twelve held-out readings less KJV reading_064 and devil reading_006 (in BM's training);
#   tok_reading  section 18's held-out 3-minute reading (--seed 11): the free runs' prompt (section 19).
#   bash recipes/evidence24/evalsets.sh OUT TEXTS     TEXTS: texts24.py dump's JSON (~16 min on 2 cores, mostly
#                                                      encoding; clean5 is encoded twice, for itself and in read10)
# Knob JOBS (synthesis processes per run, default 4); on a bare device machine bare24.sh brings flite and moshi.
set -euo pipefail
OUT=$1 TEXTS=$2 X=$(dirname "$0") PY=${PY:-python3} J=${JOBS:-4}
source "$X/bare24.sh"
source "$X/corpora.sh" "$OUT" "$TEXTS"
C=$OUT/c
CLEAN=reading_027,reading_039,reading_055,reading_091,reading_107
P=()  # a bare `wait` would return 0 whichever run failed
readings kjv 140 $J $C/clean5 --val-fraction 0 --only $CLEAN & P+=($!)
readings kjv 140 1 $C/kjv053 --val-fraction 0 --only reading_053 & P+=($!)
readings jargon 36 $J $C/jargon --val-fraction 0 --only reading_003,reading_027,reading_031 & P+=($!)
readings devil 12 1 $C/devil --val-fraction 0 --only reading_010 & P+=($!)
$PY "$X/texts24.py" run "$TEXTS" make-corpus --recordings 4 --minutes-per-recording 3 --voices flite:slt,flite:awb \
  --texts devil,jargon --seed 11 --val-fraction 0 --only reading_000 --out $C/s18 --no-progress & P+=($!)
for p in "${P[@]}"; do wait "$p"; done
$PY "$X/tok24.py" tokens $OUT/p5 $OUT/t5 20 $C/clean5
$PY "$X/tok24.py" tokens $OUT/p10 $OUT/t10 20 $C/clean5 $C/kjv053 $C/jargon $C/devil
$PY "$X/tok24.py" tokens $OUT/p18 $OUT/t18 3 $C/s18
mv $OUT/t5/train $OUT/clean5 && mv $OUT/t10/train $OUT/read10 && mv $OUT/t18/train $OUT/tok_reading
rm -rf $OUT/p5 $OUT/p10 $OUT/p18 $OUT/t5 $OUT/t10 $OUT/t18
ls $OUT/clean5 $OUT/read10 $OUT/tok_reading

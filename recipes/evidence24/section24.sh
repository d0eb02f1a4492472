#!/usr/bin/env bash
# Issue 24, docs/results.md section 24's data (call 1): section 23's 300 quote dialogues into /tmp/w/tok and,
# beside them, half of section 6's readings (corpora.sh, the same texts and seeds) into /tmp/r/tok, both tokenized
# with the shipped codec. Call 2 is then arms.sh with MIX=/tmp/r/tok/train (section 24 gives the command).
#   bash recipes/evidence24/section24.sh TEXTS        TEXTS: texts24.py dump's JSON (.exp24/texts.json.xz)
# Knobs: DIALOGUES (300), MINUTES (the dialogues', 8), RECS (corpora.sh's readings per text, "70 18 6"), RMINUTES
# (the readings', 20), JOBS / RJOBS (synthesis processes), W / R (the two work directories), PY. On a bare device
# machine bare24.sh unpacks flite and installs moshi first.
set -euo pipefail
TEXTS=$1 X=$(dirname "$0") PY=${PY:-python3} W=${W:-/tmp/w} R=${R:-/tmp/r}
S0=$SECONDS; t() { echo "[t=$((SECONDS - S0))s] $*"; }
source "$X/bare24.sh"
DIALOGUES=${DIALOGUES:-300} VAL=${VAL:-0.1} JOBS=${JOBS:-14} PY=$PY bash "$X/quote_corpus.sh" "$W" "$TEXTS"
t dialogues ready
mkdir -p "$R"
RECS=${RECS:-70 18 6} JOBS="${RJOBS:-10 3 2}" MINUTES=${RMINUTES:-20} bash "$X/corpora.sh" "$R" "$TEXTS" \
  || { cat "$R"/c_*.log; exit 1; }
t readings synthesized
$PY "$X/tok24.py" tokens "$R/pack" "$R/tok" "${RMINUTES:-20}" "$R"/c/*
t readings ready

#!/usr/bin/env bash
# Issue 24, recalling the user (docs/results.md section 21): two-voice dialogues whose model turns open by quoting
# a user sentence GAP sentences back (make-corpus --quote-fraction), tokenized with the shipped codec, the user's
# codebooks kept, into W/tok/{train,val}: what arms.sh trains on (it skips its own data when W/tok exists) and
# `eval-long --quotes W/c` scores.
#   bash recipes/evidence24/quote_corpus.sh W TEXTS     TEXTS: texts24.py dump's JSON (make-corpus's texts on a
#                                                       machine without the Debian packages); flite on the PATH
# Knobs: DIALOGUES (default 200: ~27 h at 8 minutes), MINUTES (dialogue length, 8), GAP (1: inside a short window;
# make-corpus's default is 20), FRACTION (share of the model's turns that quote, 1.0), VAL (held-out share, 0.05),
# SEED (5; sections 6-20 used 0-2 and 11), RANDOM_WORDS (set: the user says random words, make-corpus
# --random-user-words: quotes that cannot be recited from training, section 23's lesson), JOBS (synthesis
# processes, 14 of the device's 16 cores), VOICES (the five flite voices of corpora.sh), PY (interpreter). On the
# H200 machine's 16 cores 300 dialogues (40 h) took 198 s to synthesize and 84 s to encode (docs/results.md
# section 23).
# On a bare device machine (no flite, no moshi) bare24.sh unpacks flite and installs moshi first.
set -euo pipefail
W=$1 TEXTS=$2 X=$(dirname "$0") PY=${PY:-python3}
source "$X/bare24.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MIN=${MINUTES:-8}
$PY "$X/texts24.py" run "$TEXTS" make-corpus --out "$W/c/quotes" --recordings 0 --dialogues "${DIALOGUES:-200}" \
  --dialogue-minutes "$MIN" --quote-fraction "${FRACTION:-1.0}" --quote-gap-sentences "${GAP:-1}" \
  ${RANDOM_WORDS:+--random-user-words} --val-fraction "${VAL:-0.05}" --seed "${SEED:-5}" --jobs "${JOBS:-14}" \
  --no-progress --voices "${VOICES:-flite:slt,flite:awb,flite:rms,flite:kal16,flite:kal}"
$PY "$X/tok24.py" tokens "$W/pack" "$W/tok" "$MIN" "$W/c/quotes"

#!/usr/bin/env bash
# Issue 23 item 4, "the probe decides", on the issue-24 arms: probe-memory on every arm export at 1x, 4x, 10x
# and 40x the 64-frame window (32-frame spans, 64 frames of context, as section 7's copy probes), one table
# (recipes/evidence24/probe_arms.py says what is in it). CPU or GPU (DEVICE=cuda).
#   ARMS=/tmp/w VAL=/tmp/w/tok/val recipes/evidence24/probe_arms.sh        # after arms.sh: arm_*/export
#   ARMS=runs/evidence/arms2 VAL=runs/evidence/tok/val recipes/evidence24/probe_arms.sh   # exports carried back
# Knobs: OUT (default $ARMS/probe), GAPS_WINDOWS, SPAN, CONTEXT, EXCERPTS (per held-out sequence, default 1;
# at 40x each takes 2688 frames, plus 32 for the stand-in span; shorter sequences sit that gap out),
# SEQUENCES (the first N held-out sequences, default 12), DEVICE (cpu; cuda for more excerpts), PYTHON.
# CPU time: 4 SMALL_LM-shaped arms (6.97M params, window 64) with 8 excerpts per gap took 107 s wall
# (54 s CPU, one thread) on the busy 2-core dev machine (2026-12-02).
set -euo pipefail
: "${ARMS:?give ARMS=dir holding arm_d, arm_b, arm_a, arm_c, each with export/ (or an export itself)}"
: "${VAL:?give VAL=dir of held-out tokens}"
exec "${PYTHON:-python3}" "$(dirname "$0")/probe_arms.py" "$ARMS" "$VAL" "${OUT:-$ARMS/probe}" \
  --gaps-windows "${GAPS_WINDOWS:-1,4,10,40}" --span "${SPAN:-32}" --context "${CONTEXT:-64}" \
  --excerpts "${EXCERPTS:-1}" --max-sequences "${SEQUENCES:-12}" --device "${DEVICE:-cpu}"

#!/usr/bin/env bash
# Issue 24, sections 12-13: 10-minute text-only free runs of exported models on the CPU, seeds 0-2, two at a
# time (one core each), then pad ratio per minute and the pre-registered floor (pad >= 0.15 in minutes 2-9).
#   bash recipes/evidence24/free_runs.sh OUT NAME=MODEL_DIR [NAME=MODEL_DIR ...]   (SEEDS, MINUTES, PYTHON: env)
# DATA: the held-out tokens whose first sequence prompts each run (default runs/evidence/tok/val); ARGS: more
# eval-long arguments for every run (section 18: ARGS="--free-run-writes 0", the memory frozen after the prompt).
# Each model is copied without its codec, so only the text stream is generated and scored (section 10's setup).
# DEVICE (cpu) and JOBS (runs at a time, 2: one core each) set where they sample (eval26.sh: the GPU, all at once).
# Section 13's: bash recipes/evidence24/free_runs.sh runs/evidence/arms7/fr bb=EXPORT_bb br=EXPORT_br
set -uo pipefail
OUT=$1; shift
SEEDS=${SEEDS:-0 1 2} MINUTES=${MINUTES:-10} PY=${PYTHON:-python3} DATA=${DATA:-runs/evidence/tok/val} ARGS=${ARGS:-}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
mkdir -p "$OUT"
jobs=()
for spec in "$@"; do
  name=${spec%%=*} dir=${spec#*=}
  mkdir -p "$OUT/model_$name" && cp "$dir"/{model.safetensors,config.json} "$OUT/model_$name/" || exit 1
  # the device's $OUT does not bring back links: an export without its tokenizer has the package's (the same one)
  cp "$( [ -f "$dir/tokenizer.model" ] && echo "$dir" || echo src/ttt_speech/assets/small_moshi)/tokenizer.model" "$OUT/model_$name/"
  for seed in $SEEDS; do jobs+=("$name $seed"); done
done
for job in "${jobs[@]}"; do
  read -r name seed <<< "$job"
  "$PY" -m ttt_speech eval-long --model "$name=$OUT/model_$name" --data "$DATA" --lengths 64 $ARGS \
    --minutes "$MINUTES" --segment 2048 --seed "$seed" --device "${DEVICE:-cpu}" --threads 1 --no-progress \
    --out "$OUT/${name}_s$seed" > "$OUT/${name}_s$seed.log" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do sleep 5; done
done
wait
"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
from ttt_speech.eval.gibberish import PAD_FLOOR, minutes_below_pad_floor
for d in sorted(pathlib.Path(sys.argv[1]).glob("*_s*/results.json")):
    for run in json.loads(d.read_text())["free_runs"]:
        pads = [m["pad_ratio"] for m in run["minutes"]]
        print(f"{d.parent.name}: pad {' '.join(f'{p:.2f}' for p in pads)}; minutes 2-9 below {PAD_FLOOR}: "
              f"{minutes_below_pad_floor(pads)}")
PY

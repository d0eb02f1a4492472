#!/usr/bin/env bash
# Issue 24, device call (the one that ran: 2026-12-02) (one H200, 16 cores): ~60 h of flite speech, tokenized with the shipped codec,
# packed as int16 (text + 8 model codebooks) for $OUT; meanwhile the random-frame warm-up of the
# 64-frame-window base on the GPU; then its speech stage (2 in-window copies per sequence) and a first
# in-window copy probe. Run from the repository root, with the carried files in $B (recipes/evidence.sh,
# step 8, builds them): flite.tar.xz (flite + its libraries), texts.json.xz (the three texts' paragraphs),
# whl/ (moshi 0.2.13). The data and runs live in /tmp/w on the device.
set -uo pipefail
X=$PWD/recipes/evidence24 B=${B:-$PWD/.exp24} W=/tmp/w
S0=$SECONDS; t() { echo "[t=$((SECONDS - S0))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $B/whl/*.whl || exit 1
mkdir -p /tmp/fl $W && tar xJf $B/flite.tar.xz -C /tmp/fl
export PATH=/tmp/fl/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/fl/usr/lib/x86_64-linux-gnu PYTHONPATH=/tmp/site:$PWD/src \
  NO_TORCH_COMPILE=1 NO_CUDA_GRAPH=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.used --format=csv; python3 -c 'import torch, moshi; print(torch.__version__)'
flite -voice slt -t "hello" -o /tmp/h.wav && t flite ok
[ -f $W/rand_val/random.safetensors ] || { python3 $X/tok24.py silence $W/pack 16000 && python3 $X/tok24.py base $W/base 64 &&
python3 $X/tok24.py random $W/pack $W/rand_train 2000 1920 && python3 $X/tok24.py random $W/pack $W/rand_val 32 1920; } || exit 1
t setup done
rm -rf $W/warm; python3 -m ttt_speech.train $X/warm.yaml > $W/warm.log 2>&1 &
WARM=$!
V=flite:slt,flite:awb,flite:rms,flite:kal16,flite:kal
MC="python3 $X/texts24.py run $B/texts.json.xz make-corpus --dialogues 0 --minutes-per-recording 20 --voices $V --no-progress"
if [ ! -f $W/c/devil/corpus.json ]; then
$MC --out $W/c/kjv --texts kjv --recordings 140 --val-fraction 0.05 --seed 0 --jobs 10 > $W/c_kjv.log 2>&1 &
C1=$!
$MC --out $W/c/jargon --texts jargon --recordings 36 --val-fraction 0.06 --seed 1 --jobs 3 > $W/c_jargon.log 2>&1 &
C2=$!
$MC --out $W/c/devil --texts devil --recordings 12 --val-fraction 0.09 --seed 2 --jobs 2 > $W/c_devil.log 2>&1 &
C3=$!
wait $C1 $C2 $C3; fi; t corpora done; cat $W/c_*.log; du -sh $W/c
python3 $X/tok24.py encode $W/pack $W/c/kjv $W/c/jargon $W/c/devil || exit 1
t encoded
python3 $X/tok24.py unpack $W/pack $W/tok || exit 1
(mkdir -p $W/meta && for c in kjv jargon devil; do cp $W/c/$c/corpus.json $W/meta/$c.json; done
 cd $W && tar cf - pack/*.safetensors meta | xz -T6 -6 | split -b 15M - $OUT/tokens.tar.xz.) &
PACKJOB=$!
wait $WARM; t warm-up done; grep -E "val loss|exported|Error|error" $W/warm.log | tail -8
LEFT=$((540 - (SECONDS - S0) - 75)); STEPS=$(( LEFT * 11 < 1500 ? LEFT * 11 : 1500 )); t speech steps $STEPS
python3 -m ttt_speech.train $X/speech.yaml --set "stages=[{seq_len: 192, steps: $STEPS, lr: 1.5e-3, warmup: 0.05, min_lr_ratio: 0.1}]" > $W/speech.log 2>&1
t speech done rc=$?; grep -E "val loss|exported|Error|error" $W/speech.log | tail -8
python3 $X/bf16.py $W/speech/export $W/speech_bf16 && cp $W/speech_bf16/model.safetensors $OUT/speech_model.safetensors
timeout $((575 - (SECONDS - S0))) python3 -m ttt_speech eval-long --data $W/tok/val --model speech=$W/speech/export \
  --model warm=$W/warm/export --lengths 64 --baseline-length 64 --minutes 0 --copy-gaps 32,48,160 --copy-span 32 \
  --copy-context 64 --copy-probes 8 --batch-size 128 --no-progress --out $W/eval0 > $W/eval0.log 2>&1
t eval rc=$?; tail -30 $W/eval0.log
wait $PACKJOB; t packed
cd $W && tar cf $OUT/misc.tar warm.log speech.log c_*.log warm/metrics.jsonl speech/metrics.jsonl speech_bf16/config.json eval0 eval0.log
ls -la $OUT; tail -3 $W/warm.log $W/speech.log

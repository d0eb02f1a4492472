#!/usr/bin/env bash
# Issue 24 on one H200 (16 cores): ~60 h of flite speech, tokenized with the shipped codec, packed as int16
# (text + 8 model codebooks); meanwhile the random-frame warm-up of the 64-frame-window base on the GPU; then
# its speech stage (2 in-window copies per sequence, 1500 steps) and a first in-window copy probe.
# The corpus is corpora.sh's (RECS, MINUTES, JOBS pass through). Run from the repository root, with the carried files in $B (recipes/evidence.sh, step 8, builds them):
# flite.tar.xz (flite + its libraries), texts.json.xz (the three texts' paragraphs), whl/ (moshi 0.2.13); with
# arms/pack.tar.xz (the tokens made elsewhere) only whl/ and arms/ are needed.
# Everything lives in /tmp/w on the device and every phase is skipped once its output is there, so the same
# command in a later call on the same (warm) machine goes on where the last one stopped: the speech stage is
# stopped by SIGTERM at END seconds (it checkpoints) and resumed by the next call.
#   first call   END=560 bash recipes/evidence24/device1.sh     (2026-12-02: synthesis, warm-up, tokens,
#                                                               the first speech steps)
#   next call    END=... bash recipes/evidence24/device1.sh     (the rest of the 1500 steps, the base as bf16 in
#                                                               /tmp/w/base_bf16, the probe)
# $OUT gets pack_val.tar.xz (the held-out split + the silence codes + the corpora's manifests: CPU free runs and
# evals need them), speech_model.safetensors (the base, bf16) and misc.tar (logs, metrics, the probe).
# PACK=all also packs the training split (tokens.tar.xz.*, 30 MB: 2026-12-02's first run carried it back).
set -uo pipefail
X=$PWD/recipes/evidence24 B=${B:-$PWD/.exp24} W=/tmp/w END=${END:-560}
S0=$SECONDS; t() { echo "[t=$((SECONDS - S0))s] $*"; }
left() { echo $((END - (SECONDS - S0))); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $B/whl/*.whl || exit 1
mkdir -p /tmp/fl $W
export PATH=/tmp/fl/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/fl/usr/lib/x86_64-linux-gnu PYTHONPATH=/tmp/site:$PWD/src \
  NO_TORCH_COMPILE=1 NO_CUDA_GRAPH=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.used --format=csv; python3 -c 'import torch, moshi; print(torch.__version__)'
[ -f $W/rand_val/random.safetensors ] || { python3 $X/tok24.py silence $W/pack 16000 && python3 $X/tok24.py base $W/base 64 &&
python3 $X/tok24.py random $W/pack $W/rand_train 2000 1920 && python3 $X/tok24.py random $W/pack $W/rand_val 32 1920; } || exit 1
t setup done
WARM=
if [ ! -f $W/warm/export/model.safetensors ]; then
  rm -rf $W/warm; python3 -m ttt_speech.train $X/warm.yaml ${WARM_SET:+--set "$WARM_SET"} > $W/warm.log 2>&1 &
  WARM=$!
fi
# tokens made elsewhere (the same corpora encoded on a CPU: recipes/evidence.sh, step 8) replace the synthesis
[ -f $W/pack/val.safetensors ] || [ ! -f $B/arms/pack.tar.xz ] || { tar xJf $B/arms/pack.tar.xz -C $W && t pack unpacked; }
if [ ! -f $W/pack/val.safetensors ]; then
  if [ ! -f $W/c/devil/corpus.json ]; then
    [ -x /tmp/fl/usr/bin/flite ] || tar xJf $B/flite.tar.xz -C /tmp/fl || exit 1
    bash $X/corpora.sh $W $B/texts.json.xz || { cat $W/c_*.log; exit 1; }
  fi
  t corpora done; cat $W/c_*.log; du -sh $W/c
  python3 $X/tok24.py encode $W/pack $W/c/kjv $W/c/jargon $W/c/devil || exit 1
  t encoded
fi
[ -d $W/meta ] || { mkdir -p $W/meta && for c in kjv jargon devil; do cp $W/c/$c/corpus.json $W/meta/$c.json; done; }
[ -f $W/tok/val/index.json ] || python3 $X/tok24.py unpack $W/pack $W/tok || exit 1
(cd $W && tar cf - pack/val.safetensors pack/silence.safetensors meta | xz -T4 -6 > $OUT/pack_val.tar.xz
 [ "${PACK:-val}" = all ] && tar cf - pack/*.safetensors meta | xz -T6 -6 | split -b 15M - $OUT/tokens.tar.xz.) &
PACKJOB=$!
[ -n "$WARM" ] && { wait $WARM; t warm-up done; grep -E "val loss|exported|Error|error" $W/warm.log | tail -8; }
if [ ! -f $W/speech/export/model.safetensors ] && [ $(left) -gt 70 ]; then
  t speech stage until t=$((END - 40))s
  timeout -s TERM $(($(left) - 40)) python3 -m ttt_speech.train $X/speech.yaml ${SPEECH_SET:+--set "$SPEECH_SET"} >> $W/speech.log 2>&1
  t speech rc=$?; grep -E "val loss|exported|resumed|Error|error" $W/speech.log | tail -8
fi
if [ -f $W/speech/export/model.safetensors ] && [ ! -d $W/base_bf16 ]; then
  python3 $X/bf16.py $W/speech/export $W/base_bf16 && cp $W/base_bf16/model.safetensors $OUT/speech_model.safetensors
  timeout $(($(left) - 5)) python3 -m ttt_speech eval-long --data $W/tok/val --model speech=$W/speech/export \
    --lengths 64 --baseline-length 64 --minutes 0 --copy-gaps 32,48,160 --copy-span 32 --copy-context 64 \
    --copy-probes 8 --batch-size 128 --no-progress --out $W/eval0 > $W/eval0.log 2>&1
  t eval rc=$?; tail -12 $W/eval0.log
fi
wait $PACKJOB; t packed
cd $W && tar cf $OUT/misc.tar warm.log speech.log c_*.log warm/metrics.jsonl speech/metrics.jsonl eval0 eval0.log 2>/dev/null
ls -la $OUT; tail -n 3 $W/warm.log $W/speech.log

#!/usr/bin/env bash
# Issue 24, Required 4-5 on one H200: the arms fine-tuned from the speech base of docs/results.md section 6,
# side by side on the same GPU with ONE data order (seed 0), until a wall-clock deadline (SIGTERM writes a
# checkpoint; the same command again resumes it), then exported and scored with eval-long's copy probes
# and both controls. Arms: d = no memory, b = in-place (issue 23), a = TTT-Linear (ttt-lm, no RoPE),
# c = Gated DeltaNet. Every SEQ-frame sequence holds COPIES copied spans of 16-48 frames: even blocks
# 16-60 frames after their source (inside the 64-frame window), odd blocks FAR frames after (beyond it).
# Carried: .exp24/whl (moshi), .whl/f*.whl (FLA), .exp24/arms/pack.tar.xz (35 h of the training split +
# held out, int16) and .exp24/arms/base (the base, bf16, without its codec: the shipped one).
# An arm's first letter picks its branch; arms named in SHUFFLED copy shuffled spans (data.repeat.source);
# FROM=dir continues arm_<letter>/export there (a hybrid) instead of converting the base.
# Runs (docs/results.md section 7): first look  DEADLINE=240 PROBES=30 (defaults otherwise);
#   long run  call 1: ARMS="d b c" LR=3e-4 MEMLR=10 DEADLINE=530 PHASE=train GPUTESTS=1,
#             call 2: the same with DEADLINE=340 PHASE=all PROBES=30 GAPS=32,96,160,320,640,1280
#   shuffled  ARMS="b bs" SHUFFLED=bs FROM=.exp24/cont LR=3e-4 MEMLR=10 WARMUP=0.001 (the long run's B, continued)
#   far_len   ARMS="d b bs" SHUFFLED=bs FARLEN=16,320 LR=3e-4 MEMLR=10 (section 9: 11 % of the targets far
#             copies instead of 2 %), call 1 DEADLINE=540 PHASE=train, call 2 DEADLINE=330 PHASE=all KEEP="b bs"
# FARLEN=lo,hi sets data.repeat.far_len (the far copies' span lengths); KEEP names arms whose export (with
# PHASE=train: of the last checkpoint) comes back in $OUT (bf16, without the codec) for probe-memory and
# shipping. FARBLOCKS=random sets data.repeat.far_blocks (far sources at every age of the state); arms named in DECAYED get
# model.memory.decay=$DECAY (a bounded in-place state). Next (section 9, pre-registered there):
#   ARMS="d b bd" DECAYED=bd DECAY=0.9 FARLEN=16,320 FARBLOCKS=random LR=3e-4 MEMLR=10, two calls as far_len,
#   the second with LENGTHS=64,1024,2048,4096,8192 AGES=64,1024,4096 (eval-long to 8192 frames and
#   recall_age.py at those contexts, per arm, into eval_<arm>/).
# Arms named in OWN train with the model's own samples in their context (train.own_prefix=$OWNPREFIX, default
#   {prob: 1.0, every: 4, prompt: 64, frames: 256}: every 4th step, 256 own frames after 64 real ones; docs/training.md);
#   those also in DISTILLED score their own frames by KL to the model with its memory frozen after the prompt
#   (train.own_prefix.distill=$DISTILL, default 1.0). Next (section 17, pre-registered there).
# PLACEMENT=free sets data.repeat.placement (the COPIES drawn anywhere in the sequence, so more copies do not shorten
#   the far gaps as blocks of SEQ/COPIES frames do; docs/results.md section 29).
# SEQ sets the training sequence length, SEGMENT the frames per forward/backward (the state is carried between
# segments without gradient, so a decay learns only from recall inside one segment: SEGMENT=SEQ for far gaps).
# Minutes (docs/results.md section 11, pre-registered in section 10; no-go): ARMS="d bd" DECAYED=bd DECAY=0.97
#   SEQ=6144 SEGMENT=6144 BATCH=16 FAR="96, 2800" FARLEN=16,320 FARBLOCKS=random LR=3e-4 MEMLR=10, call 1
#   DEADLINE=530 PHASE=train, call 2 DEADLINE=290 PHASE=all PROBES=30 GAPS=96,640,1280,2560
#   LENGTHS=64,1024,4096,8192,14976 AGES=64,1024,4096 AGE_GAPS=640,2560 END=585 EVBATCH=360 KEEP="d bd" (467 s).
# KEEPSTEPS="1300 ..." also brings back the exports of those steps (export_<arm>_<step>; CEVERY: checkpoint.every,
#   default 100), with CKEEP (checkpoint.keep,
#   default 1) large enough to keep them: section 24's pre-registered step beside the last.
# EVBATCH sets eval-long's probes per batch (default 240): the same probes, fewer frame-by-frame passes.
# MIX=DIR adds a second training split beside W/tok/train (section 24: readings beside the dialogues).
# QUOTES=DIR adds eval-long --quotes DIR (the quotes of the dialogues in W/tok/val: quote_corpus.sh writes both, into
#   W/c and W/tok); GAPS="" leaves the copy probes out. Next (docs/results.md section 21, a plan): the shipped model
#   continued on quote dialogues 1-2 sentences back, no copies, until it quotes the user inside its window:
#   bash recipes/evidence24/quote_corpus.sh /tmp/w .exp24/texts.json.xz, then ARMS=bb FROM=.exp24/ship RARE=bb=0
#   GAPS= QUOTES=/tmp/w/c LR=3e-4 MEMLR=10 WARMUP=0.001 SEQ=1024 SEGMENT=1024 PHASE=all KEEP=bb (one call; go: quote /
#   user replaced <= 0.8 on text words, interval below, in the buckets inside the 64-frame window). Ran as section 22
#   pre-registered it (300 dialogues, a second arm bc with copies, GAPS=96,640): results section 23, no user recall.
# Arms named in RARE draw copies into only a REPEATPROB share of their sequences (data.repeat.prob; default 0.25,
#   the others 1.0): repeats the exception, as in natural speech (section 12: the memory that recalls is the one
#   that drifts). Next (section 13, pre-registered there): the shipped B-decay continued with rare repeats beside
#   the same continuation with every sequence's, FROM=.exp24/ship (arm_b/export = the shipped model):
#   ARMS="bb br" RARE=br FROM=.exp24/ship FARLEN=16,320 FARBLOCKS=random LR=3e-4 MEMLR=10
#   WARMUP=0.001 DEADLINE=400 PHASE=all PROBES=30 GAPS=96,640 LENGTHS=64,1024,4096,8192 END=585 EVBATCH=360
#   KEEP="bb br", one call; then CPU free runs of both exports (section 13 gives the commands). (Ran 2026-12-02: no-go, section 14.)
# A RARE entry "arm=p" gives that arm its own share p (0: no copies at all, natural speech only). Next (section 15,
#   pre-registered there): from the base, the shipped recipe (section 10) with copies in every sequence, in a
#   quarter, and in none, side by side: ARMS="bd bq bz" DECAYED="bd bq bz" DECAY=0.9 RARE="bq=0.25 bz=0"
#   FARLEN=16,320 FARBLOCKS=random LR=3e-4 MEMLR=10, call 1 DEADLINE=530 PHASE=train, call 2 DEADLINE=300
#   PHASE=all PROBES=30 GAPS=96,640 LENGTHS=64,1024,4096,8192 END=585 EVBATCH=360 KEEP="bd bq bz".
set -uo pipefail
X=$PWD/recipes/evidence24 B=$PWD/.exp24 W=${W:-/tmp/w}
ARMS=${ARMS:-d b a} DEADLINE=${DEADLINE:-240} LR=${LR:-5.0e-4} MEMLR=${MEMLR:-1} PHASE=${PHASE:-all}
COPIES=${COPIES:-2} FAR=${FAR:-96, 700} SEQ=${SEQ:-1536} SEGMENT=${SEGMENT:-1536} GAPS=${GAPS-32,96,160,320,640}
SHUFFLED=${SHUFFLED:-} BASE=${BASE:-$B/arms/base} STEPS=${STEPS:-20000} FROM=${FROM:-} WARMUP=${WARMUP:-0.005} FARLEN=${FARLEN:-} KEEP=${KEEP:-}
FARBLOCKS=${FARBLOCKS:-odd} PLACEMENT=${PLACEMENT:-blocks} DECAYED=${DECAYED:-} DECAY=${DECAY:-0.9} RARE=${RARE:-} OWN=${OWN:-} DISTILLED=${DISTILLED:-} DISTILL=${DISTILL:-1.0} OWNPREFIX=${OWNPREFIX:-{prob: 1.0, every: 4, prompt: 64, frames: 256\}} REPEATPROB=${REPEATPROB:-0.25} LENGTHS=${LENGTHS:-64} AGES=${AGES:-}
AGES_ARMS=$([ -n "$AGES" ] && echo $ARMS)
S0=$SECONDS; t() { echo "[t=$((SECONDS - S0))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $B/whl/*.whl $(ls .whl/f*.whl 2>/dev/null) || exit 1
export PYTHONPATH=/tmp/site:$PWD/src NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
# the base's codec is the shipped one (byte for byte): not carried twice
for d in $BASE ${FROM:+$FROM/arm_*/export}; do
  [ -d $d ] && cp src/ttt_speech/assets/small_moshi/mimi.safetensors src/ttt_speech/assets/small_moshi/mimi_config.json $d/
done
[ -d $W/tok ] || { mkdir -p $W && tar xJf $B/arms/pack.tar.xz -C $W && python3 $X/tok24.py unpack $W/pack $W/tok || exit 1; }
t data ready
if [ "${GPUTESTS:-0}" = 1 ]; then  # sphn is not carried: the serve test modules skip
  (python3 -m pytest -m gpu tests -p no:cacheprovider -o addopts= -rfE --continue-on-collection-errors \
    > $OUT/gpu_tests.log 2>&1; echo "rc=$?" >> $OUT/gpu_tests.log) &
fi
STAGES="[{seq_len: $SEQ, steps: $STEPS, lr: $LR, warmup: $WARMUP, min_lr_ratio: 1.0}]"
extra() {  # one argument per line
  local source=speech prob=1.0
  [[ " $SHUFFLED " == *" $1 "* ]] && source=shuffled
  for r in $RARE; do  # "arm" takes REPEATPROB, "arm=p" its own p
    [ "${r%%=*}" = "$1" ] && { prob=$REPEATPROB; [[ $r == *=* ]] && prob=${r#*=}; }
  done
  printf -- '--set\n%s\n' "data.repeat={prob: $prob, min_gap: 16, max_gap: 60, min_len: 16, max_len: 48, copies: $COPIES, far_gap: [$FAR],${FARLEN:+ far_len: [$FARLEN],} far_blocks: $FARBLOCKS, placement: $PLACEMENT, source: $source}"
  [[ " $DECAYED " == *" $1 "* ]] && printf -- '--set\n%s\n' model.memory.decay=$DECAY
  [[ " $OWN " == *" $1 "* ]] && printf -- '--set\n%s\n' "train.own_prefix=$OWNPREFIX"
  [[ " $DISTILLED " == *" $1 "* ]] && printf -- '--set\n%s\n' "train.own_prefix.distill=$DISTILL"
  if [ -n "$FROM" ]; then printf -- '--set\n%s\n' model.pretrained=null model.layers=all model.hybrid=$FROM/arm_${1:0:1}/export; return; fi
  printf -- '--set\n%s\n' model.pretrained=$BASE
  case ${1:0:1} in
    d) ;;
    b) printf -- '--set\n%s\n' model.layers=all model.branch=inplace ;;
    a) printf -- '--set\n%s\n' model.layers=all model.branch=ttt model.memory.variant=ttt-lm model.memory.gate_init=0.1 model.memory.use_rope=false ;;
    c) printf -- '--set\n%s\n' model.layers=all model.branch=gdn model.memory.gate_init=0.1 ;;
  esac
}
PIDS=()
for arm in $ARMS; do
  mapfile -t EXTRA < <(extra $arm)
  # own-prefix arms sample with moshi's CUDA-graphed LMGen; section15.sh's GPU check falls back to no graphs
  NOGRAPH=(); [[ " $OWN " == *" $arm "* && -f $W/own_nograph ]] && NOGRAPH=(NO_CUDA_GRAPH=1)
  env "${NOGRAPH[@]}" timeout -s TERM $DEADLINE python3 -m ttt_speech.train $X/arms.yaml --run-dir $W/arm_$arm \
    --set "data.train=[$W/tok/train${MIX:+, $MIX}]" --set "data.eval=[$W/tok/val]" \
    --set train.batch_size=${BATCH:-64} --set train.segment_len=$SEGMENT --set train.memory_lr_scale=$MEMLR \
    --set "stages=$STAGES" --set checkpoint.every=${CEVERY:-100} --set checkpoint.keep=${CKEEP:-1} --set log.every=25 --set log.eval_every=0 \
    --set log.progress=false "${EXTRA[@]}" >> $W/arm_$arm.log 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"; t trained
for arm in $ARMS; do grep -E "step +[0-9]+ |Error|error|resumed" $W/arm_$arm.log | tail -3; done
if [ "$PHASE" = all ]; then
  for arm in $ARMS; do rm -rf $W/arm_$arm/export; python3 $X/export_last.py $W/arm_$arm || true; done
  t exported
  EV="--data $W/tok/val --lengths $LENGTHS --baseline-length 64 --minutes 0 ${GAPS:+--copy-gaps $GAPS --copy-span 32
    --copy-probes ${PROBES:-20}} --copy-context 64 --copy-controls ${QUOTES:+--quotes $QUOTES} --batch-size ${EVBATCH:-240}
    --no-progress"
  for arm in $ARMS; do
    timeout $((${END:-560} - (SECONDS - S0))) python3 -m ttt_speech eval-long $EV --model $arm=$W/arm_$arm/export \
      --out $W/eval_$arm > $W/eval_$arm.log 2>&1 &
  done
  wait; t evaluated
  for arm in $AGES_ARMS; do  # recall against the memory's age (section 9), at AGE_GAPS, 3 probes per sequence
    timeout $((${END:-560} - (SECONDS - S0))) python3 $X/recall_age.py $arm=$W/arm_$arm/export $AGES ${AGE_GAPS:-640} 3 \
      $W/eval_$arm/recall_age.json $W/tok/val/tokens_00000.safetensors > $W/eval_$arm/recall_age.log 2>&1 &
  done
  wait; [ -n "$AGES_ARMS" ] && t ages
fi
wait
for arm in $KEEP; do  # a train-only call brings its last checkpoints back too: the machine may not wait for the next
  [ "$PHASE" = all ] || { rm -rf $W/arm_$arm/export; python3 $X/export_last.py $W/arm_$arm || true; }
  [ -d $W/arm_$arm/export ] && python3 $X/bf16.py $W/arm_$arm/export $OUT/export_$arm
  for s in ${KEEPSTEPS:-}; do
    python3 $X/export_last.py $W/arm_$arm $s && python3 $X/bf16.py $W/arm_$arm/export_$s $OUT/export_${arm}_$s
  done
done
cd $W && tar cf $OUT/arms.tar arm_*.log arm_*/metrics.jsonl arm_*/config.yaml eval_* 2>/dev/null
ls -la $OUT; tail -3 $OUT/gpu_tests.log 2>/dev/null || true

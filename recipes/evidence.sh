#!/usr/bin/env bash
# Issue 7 end to end: the offline corpus, the small codec, the text tokenizer, tokens, the four small
# Moshi LMs and their long-context evaluation (docs/results.md holds what this produced, and where
# each step ran). CPU steps run anywhere; GPU steps took one H100 for the timings given.
set -euo pipefail
export NO_TORCH_COMPILE=1

# 1. corpus: 20 readings + 6 two-voice dialogues of 20 min (8.7 h), half the readings re-read passages
#    from >= 10 min earlier; 15 % held out by recording. ~8 CPU-minutes on 2 cores.
ttt-speech make-corpus --out runs/corpus_lm --recordings 20 --dialogues 6 --minutes-per-recording 20 \
    --val-fraction 0.15

#    A second corpus (seed 1, all training) doubles the data: on 7.4 h alone every model memorises the
#    training split. Its recordings that re-read a passage of a held-out recording are dropped.
ttt-speech make-corpus --out runs/corpus_lm2 --recordings 24 --dialogues 4 --minutes-per-recording 20 \
    --val-fraction 0 --seed 1
python - <<'PY'
import json
held_out = [r for r in json.load(open("runs/corpus_lm/corpus.json"))["recordings"] if r["split"] == "val"]
def overlaps(r, v):
    a, b = r["text"], v["text"]
    return a["source"] == b["source"] and max(a["first_sentence"], b["first_sentence"]) < min(
        a["first_sentence"] + a["sentences"], b["first_sentence"] + b["sentences"])
keep = [r for r in json.load(open("runs/corpus_lm2/corpus.json"))["recordings"]
        if not any(overlaps(r, v) for v in held_out)]
with open("runs/corpus_lm2/train_nooverlap.jsonl", "w") as f:
    f.writelines(json.dumps({"path": r["path"], "duration": r["duration"]}) + "\n" for r in keep)
PY

# 2. codec (GPU, ~7 min on an H100): 12.5 Hz x 8 codebooks of 1024, trained on 7-minute excerpts of every
#    training channel (3.15 h; the device run read them as Opus, 32 kbit/s, to fit its upload limit).
ttt-speech train-codec configs/codec_small.yaml --run-dir runs/codec_v2 \
    --set "data.train=[runs/corpus_lm/train.jsonl]" --set "data.eval=[runs/corpus_lm/val.jsonl]" \
    --set 'stages=[{seq_len: 25, steps: 1000, lr: 1.0e-3, warmup: 0.05, min_lr_ratio: 1.0}, {seq_len: 50, steps: 5000, lr: 1.0e-3, warmup: 0.0, min_lr_ratio: 0.05}]'
ttt-speech eval-codec runs/codec_v2 --data runs/corpus_lm/val.jsonl --seconds 10 --codebooks 1,4,8 \
    --out runs/codec_v2/eval

# 3. a new Moshi-architecture LM (random weights) with that codec and a tokenizer trained on the texts,
#    then tokens (~40 minutes on 2 CPU cores for the 18 h; a silent channel costs nothing).
ttt-speech init-moshi --codec runs/codec_v2 --corpus runs/corpus_lm --out runs/small_moshi
ttt-speech tokenize runs/corpus_lm/val.jsonl --out runs/tokens_lm/val --checkpoint runs/small_moshi
ttt-speech tokenize runs/corpus_lm/train.jsonl --out runs/tokens_lm/train --checkpoint runs/small_moshi
ttt-speech tokenize runs/corpus_lm2/train_nooverlap.jsonl --out runs/tokens_lm2/train --checkpoint runs/small_moshi

# 4. the four models (GPU; on one H100 the three from-scratch runs share the GPU, ~9 min in all):
#    (a) vanilla, (b) TTT hybrid, (d) Gated DeltaNet hybrid - equal budgets; then (c) = (a) converted.
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_vanilla
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_ttt \
    --set model.layers=all --set model.branch=ttt --set 'model.memory={variant: fla, gate_init: 0.1}'
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_gdn \
    --set model.layers=all --set model.branch=gdn --set 'model.memory={gate_init: 0.1}'
python -m ttt_speech.train configs/small_moshi_convert.yaml --run-dir runs/lm_converted

# 5. evaluation: per-position loss to 12 800 frames (51x the 250-frame window), the re-read passages,
#    and a free run of 60 minutes per model.
ttt-speech eval-long --data runs/tokens_lm/val --repeats runs/corpus_lm \
    --model vanilla=runs/lm_vanilla/export --model ttt=runs/lm_ttt/export \
    --model converted=runs/lm_converted/export --model gdn=runs/lm_gdn/export \
    --lengths 250,500,1000,2500,5000,12800 --baseline-length 250 --batch-size 4 --minutes 60 \
    --out runs/eval_lm

# 6. (f) memory-targeted fine-tuning, CPU-sized (docs/results.md): the TTT hybrid and the same network
#    without its TTT branches, 100 steps of 8 x 1600 frames, every sequence with a span copied >= 300
#    frames later (~32 min on one CPU core each); then recall against distance and the TTT state probe.
python - <<'PY'
import json, shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
from ttt_speech.names import current_name, is_memory
src, dst = Path("runs/lm_ttt/export"), Path("runs/vanilla_from_b")
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.name not in ("config.json", "model.safetensors"):
        shutil.copy(f, dst / f.name)
config = json.loads((src / "config.json").read_text())
config.pop("memory", None), config.pop("ttt", None)  # the branch's section (named ttt before issue 20)
(dst / "config.json").write_text(json.dumps(config, indent=2))
save_file({k: v for k, v in load_file(src / "model.safetensors").items() if not is_memory(current_name(k))},
          dst / "model.safetensors")
PY
COPIES=(--set train.precision=fp32 --set train.batch_size=8 --set train.device=cpu
  --set 'data.repeat={prob: 1.0, min_gap: 300, min_len: 150, max_len: 500}'
  --set 'stages=[{seq_len: 1600, steps: 100, lr: 5.0e-4, warmup: 0.1, min_lr_ratio: 0.1}]')
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/cpu7/ttt "${COPIES[@]}" \
    --set model.pretrained=null --set model.hybrid=runs/lm_ttt/export --set model.layers=all
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/cpu7/vanilla "${COPIES[@]}" \
    --set model.pretrained=runs/vanilla_from_b
ttt-speech eval-long --data runs/tokens_lm/val --model vanilla_ft=runs/cpu7/vanilla/export \
    --model ttt_ft=runs/cpu7/ttt/export --model ttt_b=runs/lm_ttt/export --model vanilla_from_b=runs/vanilla_from_b \
    --lengths 500 --baseline-length 250 --minutes 0 --copy-gaps 300,1000,3000,7500 --copy-span 200 \
    --batch-size 16 --out runs/cpu7/eval_ft
ttt-speech probe-memory --data runs/tokens_lm/val ttt_ft=runs/cpu7/ttt/export ttt_b=runs/lm_ttt/export
ttt-speech probe-memory --data runs/tokens_lm/val --gaps 48,160 --span 48 ttt_ft=runs/cpu7/ttt/export
#    the same with the ttt-lm variant's step sizes: vanilla_ft converted, 60 steps on copies
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/cpu7/ttt_lm_conv "${COPIES[@]}" \
    --set 'stages=[{seq_len: 1600, steps: 60, lr: 1.0e-3, warmup: 0.1, min_lr_ratio: 0.1}]' \
    --set model.pretrained=runs/cpu7/vanilla/export --set model.layers=all --set model.branch=ttt --set 'model.memory={variant: ttt-lm, gate_init: 0.1}'
ttt-speech probe-memory --data runs/tokens_lm/val --gaps 300,1000 ttt_lm_conv=runs/cpu7/ttt_lm_conv/export

# 7. (g) memory-targeted training from scratch at full budget (GPU: the four at once, ~4 min on one
#    H100), every sequence with a 200-800-frame span copied >= 300 frames later; then the control:
#    vanilla with every copy 100-200 frames later, inside its own window.
REP='data.repeat={prob: 1.0, min_gap: 300, min_len: 200, max_len: 800}'
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_vanilla_rep --set "$REP"
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_ttt_rep --set "$REP" \
    --set model.layers=all --set model.branch=ttt --set 'model.memory={variant: fla, gate_init: 0.1}'
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_ttt_lm_rep --set "$REP" \
    --set model.layers=all --set model.branch=ttt --set 'model.memory={variant: ttt-lm, gate_init: 0.1}'
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_gdn_rep --set "$REP" \
    --set model.layers=all --set model.branch=gdn --set 'model.memory={gate_init: 0.1}'
python -m ttt_speech.train configs/small_moshi.yaml --run-dir runs/lm_vanilla_in \
    --set 'data.repeat={prob: 1.0, min_gap: 100, max_gap: 200, min_len: 50, max_len: 100}'
for m in vanilla_rep ttt_rep ttt_lm_rep gdn_rep; do
  ttt-speech eval-long --data runs/tokens_lm/val --repeats runs/corpus_lm --model $m=runs/lm_$m/export \
      --lengths 250,2500,12800 --baseline-length 250 --batch-size 4 --minutes 0 \
      --copy-gaps 300,1000,3000,7500 --copy-probes 2 --out runs/eval_$m
done
ttt-speech probe-memory --data runs/tokens_lm/val ttt_rep=runs/lm_ttt_rep/export ttt_lm_rep=runs/lm_ttt_lm_rep/export
ttt-speech eval-long --data runs/tokens_lm/val --model vanilla_rep=runs/lm_vanilla_rep/export \
    --model vanilla_in=runs/lm_vanilla_in/export --lengths 250 --baseline-length 250 --batch-size 4 \
    --minutes 0 --copy-span 100 --copy-gaps 100,200,300,1000 --copy-probes 2 --dtype float32 --out runs/eval_inwindow

# 8. Issue 24 (docs/results.md section 6): ~63 h of flite speech tokenized with the shipped codec and a
#    64-frame-window base that copies inside its window, all in one H200 call (~7 min of it; 16 cores
#    synthesize while the GPU trains on random frames). First, here (Debian bookworm), the files it carries:
R=/tmp/i24root; mkdir -p $R .exp24/whl && (cd /tmp && apt-get download flite libflite1 libasound2 bible-kjv \
    bible-kjv-text dict-devil jargon-text && for f in /tmp/*.deb; do dpkg -x $f $R; done)
tar cJf .exp24/flite.tar.xz -C $R usr/bin/flite usr/lib/x86_64-linux-gnu
PATH=$R/usr/bin:$PATH python recipes/evidence24/texts24.py dump $R .exp24/texts.json.xz
pip download --no-deps --only-binary=:all: -d .exp24/whl moshi==0.2.13
#    Either the tokens here on the CPU (2026-12-02, 2 cores: synthesis ~35 min, encoding ~95 min in parallel
#    parts beside other work), carried as .exp24/arms/pack.tar.xz, which device1.sh unpacks instead of synthesizing:
E=runs/evidence X=recipes/evidence24
PATH=$R/usr/bin:$PATH LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu JOBS="2 1 1" bash $X/corpora.sh $E .exp24/texts.json.xz
python $X/tok24.py silence $E/pack_a 16000 && mkdir -p $E/pack_b && cp $E/pack_a/silence.safetensors $E/pack_b/
GROUP=4 PART=0/2 python $X/tok24.py encode $E/pack_a $E/c/kjv $E/c/jargon $E/c/devil &
GROUP=4 PART=1/2 python $X/tok24.py encode $E/pack_b $E/c/kjv $E/c/jargon $E/c/devil; wait
python $X/tok24.py merge $E/pack $E/pack_a $E/pack_b && mkdir -p $E/meta .exp24/arms \
    && for c in kjv jargon devil; do cp $E/c/$c/corpus.json $E/meta/$c.json; done \
    && (cd $E && tar cf - pack/*.safetensors meta | xz -T2 -6) > .exp24/arms/pack.tar.xz
#    or all of it on the device (carry .exp24; PACK=all brings tokens.tar.xz.* (text + 8 model codebooks, int16,
#    xz: 30 MB) back; speech_model.safetensors (the base, bf16) and misc.tar (logs, metrics, a first probe) come
#    to $OUT either way; END stops a call, the same command in the next call goes on):
END=560 PACK=all bash recipes/evidence24/device1.sh
#    Back here: the tokens as `ttt-speech tokenize` directories (user streams rebuilt from the silence codes),
#    the base as a checkpoint directory, and its copy probes with intervals and both controls (CPU, ~15 min).
E=runs/evidence; mkdir -p $E/base_speech && cat $OUT/tokens.tar.xz.* | xz -d | tar xf - -C $E
tar xf $OUT/misc.tar -C $E && cp $E/speech_bf16/config.json $OUT/speech_model.safetensors $E/base_speech/ \
    && mv $E/base_speech/speech_model.safetensors $E/base_speech/model.safetensors \
    && cp src/ttt_speech/assets/small_moshi/{mimi.safetensors,mimi_config.json,tokenizer.model} $E/base_speech/
python recipes/evidence24/tok24.py unpack $E/pack $E/tok
ttt-speech eval-long --data $E/tok/val --model base=$E/base_speech --lengths 64 --baseline-length 64 --minutes 0 \
    --copy-gaps 32,48,64,96,160,320,640 --copy-span 32 --copy-context 64 --copy-probes 30 --copy-controls \
    --batch-size 120 --dtype float32 --out $E/eval_base

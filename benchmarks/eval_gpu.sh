#!/usr/bin/env bash
# eval-long on a GPU at a size beyond the CPU tests (docs/benchmarks.md, "eval-long on GPU"):
# a Moshi-shaped model (dim ${DIM:-1024}, 8 layers, attention window 250 frames; random weights in the
# released checkpoint format) vanilla vs converted to a TTT hybrid (gate 0.05), streamed frame by frame
# over random held-out tokens to 32x its window, plus a one-minute free run of each.
# Usage: bash benchmarks/eval_gpu.sh OUT_DIR [LENGTHS]   (report: OUT_DIR/report/)
set -euo pipefail
OUT=${1:?OUT_DIR}
LENGTHS=${2:-1000,2000,4000,8000}
R=runs/bench_eval
mkdir -p "$OUT" $R/data
export NO_TORCH_COMPILE=1
python3 - $R "${DIM:-1024}" "${LENGTHS##*,}" <<'PY'
import sys
import numpy as np
from ttt_speech.moshi.tiny import tiny_lm_config, write_tiny_checkpoint

root, dim, longest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = tiny_lm_config(dim=dim, num_heads=16, num_layers=8, context=250, text_card=32000, card=2048,
                     existing_text_padding_id=3, n_q=16, dep_q=8, depformer_dim=512,
                     depformer_dim_feedforward=1536, depformer_num_heads=8, depformer_num_layers=4,
                     delays=[0] + ([0] + [1] * 7) * 2)
write_tiny_checkpoint(f"{root}/vanilla", lm_config=cfg, tokenizer=False)
rng = np.random.default_rng(0)
for i in range(2):
    codes = np.concatenate([rng.integers(0, 32000, (1, longest + 8)), rng.integers(0, 2048, (16, longest + 8))])
    np.save(f"{root}/data/seq{i}.npy", codes.astype(np.int32))
PY
python3 -m ttt_speech convert-moshi --moshi-weights $R/vanilla/model.safetensors --config $R/vanilla/config.json --out $R/hybrid --branch ttt --gate-init 0.05 --dtype bfloat16
python3 -m ttt_speech eval-long --model vanilla=$R/vanilla --model hybrid=$R/hybrid --data $R/data --lengths "$LENGTHS" \
  --max-sequences 1 --minutes 1 --no-asr --out "$OUT/report"

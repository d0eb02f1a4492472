#!/usr/bin/env bash
# The trainer on GPUs (docs/benchmarks.md, "Training"). Needs 2 CUDA devices; writes under runs/bench.
#   1. configs/tiny_recall.yaml alone, then under torchrun with DDP and with FSDP2 on 2 GPUs (same
#      global batch): the three loss curves should agree.
#   2. A 0.2B-parameter Moshi-shaped model (written here with random weights, released checkpoint
#      format) through the four context-extension stages 8k -> 65k frames on 2 GPUs with FSDP2:
#      peak memory and tokens/s per stage show that training memory stays linear in length.
#      TTT uses variant "fla" here: FLA's chunk kernel trains it; the default "ttt-lm" variant trains
#      through our Triton kernel (ops/ttt/triton_chunk.py; before it: ~600 tokens/s at this shape).
# Usage: bash benchmarks/train_gpu.sh [OUT_DIR] [all|recall|long]   (results: OUT_DIR/*.jsonl)
set -euo pipefail
OUT=${1:-runs/bench/out}
PART=${2:-all}
R=runs/bench
mkdir -p "$OUT" "$R"
export NO_TORCH_COMPILE=1

python3 - "$R" <<'EOF'
import sys
import numpy as np
from ttt_speech.moshi.tiny import tiny_lm_config, write_tiny_checkpoint
from ttt_speech.train.synthetic import RecallTask

root = sys.argv[1]
task = RecallTask()
task.write(f"{root}/recall_train.safetensors", 4096, 0)
task.write(f"{root}/recall_val.safetensors", 64, 1)
# Moshi's layout (text + 8 model + 8 user codebooks, acoustic delay 1) at a width that trains fast
cfg = tiny_lm_config(dim=1024, num_heads=16, num_layers=8, context=3000, text_card=32000, card=2048,
                     existing_text_padding_id=3, n_q=16, dep_q=8, depformer_dim=512,
                     depformer_dim_feedforward=1536, depformer_num_heads=8, depformer_num_layers=4,
                     delays=[0] + ([0] + [1] * 7) * 2)
write_tiny_checkpoint(f"{root}/moshi_medium", lm_config=cfg, tokenizer=False)
rng = np.random.default_rng(0)
for i in range(4):  # random tokens: this measures memory and speed, not learning
    codes = np.concatenate([rng.integers(0, 32000, (1, 66000)), rng.integers(0, 2048, (16, 66000))])
    np.save(f"{root}/long_{i}.npy", codes.astype(np.int32))
EOF

if [[ $PART != long ]]; then
recall=(configs/tiny_recall.yaml --set "data.train=[$R/recall_train.safetensors]"
        --set "data.eval=[$R/recall_val.safetensors]" --set log.progress=false)
python3 -m ttt_speech.train "${recall[@]}" --run-dir $R/recall_1proc
for p in ddp fsdp; do
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m ttt_speech.train "${recall[@]}" \
    --set train.parallel=$p --run-dir $R/recall_2gpu_$p
done
for d in recall_1proc recall_2gpu_ddp recall_2gpu_fsdp; do cp $R/$d/metrics.jsonl "$OUT/$d.jsonl"; done
fi
[[ $PART == recall ]] && exit 0

cat > $R/long.yaml <<EOF
run_dir: $R/long
model: {family: moshi, pretrained: $R/moshi_medium, layers: all, branch: ttt, ttt: {variant: fla, mini_batch: 16}}
data: {train: [$R/long_0.npy, $R/long_1.npy, $R/long_2.npy, $R/long_3.npy]}
train: {batch_size: 2, segment_len: 16384, attention_window: 750, grad_checkpointing: true, parallel: fsdp,
        trainable: memory}
stages:
  - {seq_len: 8192, steps: 3, lr: 1.0e-4}
  - {seq_len: 16384, steps: 3, lr: 1.0e-4}
  - {seq_len: 32768, steps: 3, lr: 1.0e-4}
  - {seq_len: 65536, steps: 3, lr: 1.0e-4}
checkpoint: {every: 1000}
log: {eval_every: 0, progress: false}
EOF
python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m ttt_speech.train $R/long.yaml
cp $R/long/metrics.jsonl "$OUT/long.jsonl"

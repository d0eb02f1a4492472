"""Long-context fine-tuning of TTT hybrids: stages, segments carrying TTT state, crash-safe checkpoints.

    python -m ttt_speech.train configs/moshi_long.yaml          # or: torchrun --nproc-per-node N -m ...
    python -m ttt_speech.train tokenize data.jsonl --out tokens/ --checkpoint MOSHI_DIR
    python -m ttt_speech.train plot-run RUN_DIR
"""

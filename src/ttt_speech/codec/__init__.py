"""A small Mimi-architecture speech codec trained from scratch (moshi ships Mimi without training code).

    ttt-speech train-codec configs/codec_small.yaml      # or: python -m ttt_speech.codec CONFIG
    ttt-speech eval-codec RUN_DIR/export --data val.jsonl  # or: python -m ttt_speech.codec eval ...

The export (mimi.safetensors + mimi_config.json) is moshi's released Mimi format: `get_mimi` and
`ttt-speech tokenize` (through a Moshi checkpoint directory naming the files) load it.
"""

"""Mimi's audio clock, defined once: every model, codec and stream in ttt_speech runs on it."""

SAMPLE_RATE = 24000  # samples per second of the audio Mimi encodes and decodes
FRAME_RATE = 12.5  # Mimi frames (Moshi steps) per second
FRAME_SIZE = round(SAMPLE_RATE / FRAME_RATE)  # 1920 samples (80 ms): SEANet's 960 hop, then Mimi's 2x downsampling

"""Synthetic audio for tests and smoke runs: harmonic tones with vibrato, chirps and noise bursts.

Speech-like enough to have pitch, harmonics, onsets and silences for the codec to reconstruct,
made in code so that nothing needs downloading.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ttt_speech.audio import SAMPLE_RATE


def synthetic_signal(seconds: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[samples] float32 in [-1, 1]: notes of 0.1-0.6 s (harmonic tone, chirp or noise) with gaps."""
    n = int(seconds * sample_rate)
    out = np.zeros(n, dtype=np.float64)
    t0 = 0
    while t0 < n:
        length = int(rng.uniform(0.1, 0.6) * sample_rate)
        t = np.arange(min(length, n - t0)) / sample_rate
        kind = rng.integers(3)
        if kind == 0:  # voiced: a few harmonics of a pitch with vibrato
            f0 = rng.uniform(90, 300) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            note = sum(np.sin(k * phase) / k for k in range(1, 6))
        elif kind == 1:  # chirp
            f_start, f_end = rng.uniform(200, 4000, 2)
            f = f_start + (f_end - f_start) * t / max(t[-1], 1e-9)
            note = np.sin(2 * np.pi * np.cumsum(f) / sample_rate)
        else:  # noise burst ("fricative")
            note = rng.standard_normal(len(t)) * 0.3
        envelope = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
        out[t0: t0 + len(t)] = rng.uniform(0.1, 0.5) * note * envelope / 2
        t0 += len(t) + int(rng.uniform(0.0, 0.2) * sample_rate)
    return np.clip(out, -1, 1).astype(np.float32)


def write_synthetic_audio(out_dir: str | Path, files: int, seconds: float, seed: int = 0, channels: int = 2,
                          sample_rate: int = SAMPLE_RATE, manifest: str = "audio.jsonl") -> Path:
    """`files` wavs of `channels` independent signals and a jsonl manifest naming them; returns the manifest."""
    import sphn

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(files):
        wav = np.stack([synthetic_signal(seconds, rng, sample_rate) for _ in range(channels)])
        name = f"synth_{i:04d}.wav"
        sphn.write_wav(str(root / name), wav, sample_rate)
        lines.append(json.dumps({"path": name, "duration": wav.shape[-1] / sample_rate}))
    path = root / manifest
    path.write_text("\n".join(lines) + "\n")
    return path

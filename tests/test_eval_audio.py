"""Audio scoring: resampling, WER, the MFCC voice measure on synthetic voices, and pocketsphinx when present."""

from __future__ import annotations

import math
import shutil
import subprocess
import wave

import numpy as np
import pytest

from ttt_speech.dsp import resample
from ttt_speech.eval.asr import Recognizer, asr_available, word_error_rate
from ttt_speech.eval.speaker import SpeakerEmbedder, cosine, mfcc_embedding

RATE = 24000


def voice(f0: float, formants: list[float], seconds: float, seed: int) -> np.ndarray:
    """A buzzy vowel-like voice: harmonics of a wobbling f0 shaped by formant peaks, in syllable bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f) / RATE
    x = np.zeros_like(t)
    for k in range(1, int(4000 / f0)):
        gain = sum(math.exp(-((k * f0 - fm) / 150.0) ** 2) for fm in formants) + 0.02
        x += gain * np.sin(k * phase)
    bursts = np.sin(2 * np.pi * 2.5 * t + rng.uniform(0, 6)) > -0.3
    x = x * bursts / np.abs(x).max() * 0.5 + 0.003 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def test_word_error_rate():
    assert word_error_rate("the cat sat on the mat", "the cat sat on the mat") == 0.0
    assert word_error_rate("the cat sat on the mat", "the bat sat on mat") == pytest.approx(2 / 6)
    assert word_error_rate("\u2581Hello,\u2581world!", "hello world") == 0.0  # SentencePiece marks, punctuation
    assert word_error_rate("", "anything") is None


def test_mfcc_voice_measure_tells_voices_apart():
    """Same synthetic voice on other bursts: > 0.98; another voice: < 0.9; noise: < 0.5."""
    low = [700.0, 1200.0, 2500.0]
    a1, a2 = voice(110, low, 4, 1), voice(112, low, 4, 2)
    b = voice(220, [400.0, 2000.0, 3000.0], 4, 3)
    noise = (np.random.default_rng(4).standard_normal(4 * RATE) * 0.3).astype(np.float32)
    e = [mfcc_embedding(x, RATE) for x in (a1, a2, b, noise)]
    same, other, vs_noise = cosine(e[0], e[1]), cosine(e[0], e[2]), cosine(e[0], e[3])
    assert same > 0.98 and other < 0.9 and vs_noise < 0.5, (same, other, vs_noise)
    assert mfcc_embedding(np.zeros(100, np.float32), RATE) is None  # shorter than one window
    assert SpeakerEmbedder(prefer_resemblyzer=False).method == "mfcc-stats"


@pytest.mark.skipif(asr_available() is not None, reason="pocketsphinx not installed")
@pytest.mark.skipif(shutil.which("flite") is None, reason="flite (Debian) not installed to make test speech")
def test_pocketsphinx_transcribes_synthetic_speech(tmp_path):
    text = "the dog ran home and the cat sat on the mat"
    subprocess.run(["flite", "-voice", "rms", "-t", text, "-o", str(tmp_path / "s.wav")], check=True)
    with wave.open(str(tmp_path / "s.wav")) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    at_24k = resample(x, rate, RATE)  # as Mimi would hand it over
    asr = Recognizer()
    wer = word_error_rate(text, asr.transcribe(at_24k, RATE))
    assert wer <= 0.2, wer  # flite rms: 0.0 here; slt/awb/kal16: 0.18-0.27
    noise = (np.random.default_rng(0).standard_normal(2 * RATE) * 0.2).astype(np.float32)
    assert word_error_rate(text, asr.transcribe(noise, RATE)) >= 0.8


def test_missing_pocketsphinx_is_a_clear_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pocketsphinx(name, *args, **kwargs):
        if name == "pocketsphinx":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pocketsphinx)
    assert "pip install pocketsphinx" in asr_available()
    with pytest.raises(RuntimeError, match="pocketsphinx is not installed"):
        Recognizer()

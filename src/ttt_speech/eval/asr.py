"""Intelligibility of generated speech: offline ASR (pocketsphinx) against the model's own text, as WER.

pocketsphinx ships its en-us acoustic model, language model and dictionary inside its wheel, so it
runs with no download (`pip install pocketsphinx`, the `eval` extra). It is a weak recogniser
(WER about 0.1-0.2 on clean synthetic speech), so its WER is a trend across minutes and models, not
an absolute intelligibility score; and Moshi's text stream is its inner monologue, which leads the
audio by a fraction of a second, so words can cross minute boundaries.
"""

from __future__ import annotations

import re

import numpy as np

from ttt_speech.dsp import resample

ASR_RATE = 16000


def asr_available() -> str | None:
    """None when pocketsphinx can be used, else the reason it cannot."""
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return "pocketsphinx is not installed (pip install pocketsphinx, or the 'eval' extra): no ASR/WER"
    return None


class Recognizer:
    """pocketsphinx's bundled en-us model on 16 kHz audio; one decoder reused across utterances."""

    def __init__(self) -> None:
        reason = asr_available()
        if reason:
            raise RuntimeError(reason)
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")

    def transcribe(self, audio: np.ndarray, rate: int) -> str:
        pcm = (np.clip(resample(audio, rate, ASR_RATE), -1.0, 1.0) * 32767).astype(np.int16)
        self.decoder.start_utt()
        self.decoder.process_raw(pcm.tobytes(), full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


def words(text: str) -> list[str]:
    """Lower-case words, punctuation and SentencePiece's word marks dropped."""
    return re.findall(r"[a-z0-9']+", text.replace("\u2581", " ").lower())


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """Levenshtein distance over words / reference words; None for an empty reference."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return None
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)

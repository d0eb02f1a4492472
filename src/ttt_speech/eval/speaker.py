"""Voice consistency of a generated stream: speaker similarity of each minute to the first, no download.

Two embedders, chosen by what is installed:
- Resemblyzer (`pip install resemblyzer`; its GE2E speaker encoder ships inside the package): a real
  speaker-verification embedding; same voice about 0.85-0.9, different voices 0.4-0.75 cosine.
- otherwise MFCC statistics (always available, plain torch): the mean and standard deviation of 19
  MFCCs (c0, the loudness, left out) over the voiced frames. It captures timbre and channel, not
  identity: text, prosody and noise move it too, so read it only as a relative trend along one
  run (a voice that drifts or collapses into noise drops), never as "same speaker" evidence.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MFCC_RATE = 16000


def resemblyzer_available() -> bool:
    try:
        import resemblyzer  # noqa: F401
    except ImportError:
        return False
    return True


def _mel_filters(n_fft: int, n_mels: int, rate: int) -> torch.Tensor:
    def hz_to_mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(20.0), hz_to_mel(rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    return torch.clamp(torch.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), min=0.0)


def mfcc(audio: np.ndarray, rate: int = MFCC_RATE, n_mfcc: int = 20, n_mels: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """MFCCs [frames, n_mfcc] of 25 ms windows every 10 ms, and each frame's log energy [frames]."""
    x = torch.as_tensor(np.asarray(audio), dtype=torch.float32)
    n_fft, hop = int(0.025 * rate), int(0.010 * rate)
    if len(x) < n_fft:
        return torch.zeros(0, n_mfcc), torch.zeros(0)
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=False, return_complex=True).abs() ** 2
    mel = torch.log(_mel_filters(n_fft, n_mels, rate) @ spec + 1e-10).T  # [frames, n_mels]
    k = torch.arange(n_mels, dtype=torch.float32)
    dct = torch.cos(math.pi / n_mels * (k[None, :] + 0.5) * torch.arange(n_mfcc, dtype=torch.float32)[:, None])
    return mel @ dct.T, torch.log(spec.sum(0) + 1e-10)


def mfcc_embedding(audio: np.ndarray, rate: int) -> np.ndarray | None:
    """Mean and std of MFCC 1..19 over frames within 30 dB of the loudest; None without voiced frames."""
    from ttt_speech.dsp import resample

    coeffs, energy = mfcc(resample(audio, rate, MFCC_RATE))
    if len(energy) == 0:
        return None
    voiced = energy > energy.max() - math.log(1e3)
    c = coeffs[voiced, 1:]
    if len(c) < 2:
        return None
    return torch.cat([c.mean(0), c.std(0)]).numpy()


class SpeakerEmbedder:
    """Resemblyzer's encoder when installed, else MFCC statistics; `method` says which."""

    def __init__(self, prefer_resemblyzer: bool = True) -> None:
        self.method = "resemblyzer" if prefer_resemblyzer and resemblyzer_available() else "mfcc-stats"
        if self.method == "resemblyzer":
            from resemblyzer import VoiceEncoder

            self._encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(self, audio: np.ndarray, rate: int) -> np.ndarray | None:
        if self.method == "mfcc-stats":
            return mfcc_embedding(audio, rate)
        from resemblyzer import preprocess_wav

        wav = preprocess_wav(np.asarray(audio, dtype=np.float32), source_sr=rate)
        return self._encoder.embed_utterance(wav) if len(wav) else None


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0)) if denom > 0 else None  # rounding can pass 1

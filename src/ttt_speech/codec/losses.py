"""Reconstruction losses and audio metrics for the codec (EnCodec/Mimi papers), computed in fp32.

The mel filterbank is built here (HTK mel scale, triangular filters) so that torchaudio is not a
dependency. Log-mel distances are taken over several STFT windows: short windows judge timing,
long ones pitch and timbre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_FLOOR = 1e-3


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters evenly spaced on the HTK mel scale from 0 to Nyquist."""
    def mel(f: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    top = mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    edges = 700.0 * (10 ** (torch.linspace(0, float(top), n_mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMel(nn.Module):
    """log(mel magnitude spectrogram) of [B, T] audio for one window size (hop: window / 4)."""

    def __init__(self, n_fft: int, n_mels: int, sample_rate: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        spec = torch.stft(x.float(), self.n_fft, self.n_fft // 4, window=self.window, center=True,
                          pad_mode="constant", normalized=True, return_complex=True).abs()
        return torch.log(self.filters @ spec + LOG_FLOOR)


class ReconstructionLoss(nn.Module):
    """Waveform L1 and multi-scale log-mel L1 / L2 (each averaged over the scales), unweighted."""

    def __init__(self, windows: list[int], n_mels: int, sample_rate: int) -> None:
        super().__init__()
        self.mels = nn.ModuleList(LogMel(w, n_mels, sample_rate) for w in windows)

    def forward(self, ref: Tensor, est: Tensor) -> dict[str, Tensor]:
        """`ref`, `est`: [B, 1, T] or [B, T]."""
        ref, est = ref.reshape(ref.shape[0], -1).float(), est.reshape(est.shape[0], -1).float()
        with torch.autocast(ref.device.type, enabled=False):
            l1 = l2 = ref.new_zeros(())
            for mel in self.mels:
                a, b = mel(ref), mel(est)
                l1 = l1 + F.l1_loss(b, a)
                l2 = l2 + F.mse_loss(b, a)
            n = len(self.mels)
            return {"wave_l1": F.l1_loss(est, ref), "mel_l1": l1 / n, "mel_l2": l2 / n}


def si_snr(ref: Tensor, est: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-noise ratio in dB per item of [B, T] (or [B, 1, T]) audio."""
    ref, est = ref.reshape(ref.shape[0], -1).double(), est.reshape(est.shape[0], -1).double()
    ref = ref - ref.mean(-1, keepdim=True)
    est = est - est.mean(-1, keepdim=True)
    target = (est * ref).sum(-1, keepdim=True) / ((ref * ref).sum(-1, keepdim=True) + eps) * ref
    noise = est - target
    return (10 * torch.log10(((target ** 2).sum(-1) + eps) / ((noise ** 2).sum(-1) + eps))).float()

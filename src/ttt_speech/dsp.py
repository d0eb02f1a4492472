"""Signal processing shared by the corpus builder, the codec and the evaluation (numpy, no extra deps)."""

from __future__ import annotations

import math

import numpy as np


def resample(x: np.ndarray, rate_in: int, rate_out: int, zeros: int = 16) -> np.ndarray:
    """Polyphase windowed-sinc resampling: each output phase is one strided dot product over the input.

    Upsampling by the full ratio first and filtering would cost x160 for 22 050 -> 24 000 Hz.
    """
    if rate_in == rate_out:
        return np.asarray(x, dtype=np.float32)
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    scale = min(1.0, up / down)  # the low-pass cutoff, relative to the input's Nyquist
    width = math.ceil(zeros / scale)
    d = (np.arange(up) * down % up / up)[:, None] - np.arange(-width + 1, width + 1)  # output time - tap, in inputs
    bank = scale * np.sinc(scale * d) * (0.5 + 0.5 * np.cos(np.pi * d / width))  # [phase, 2 * width]
    xp = np.concatenate([np.zeros(width - 1), np.asarray(x, np.float64), np.zeros(width + 1)])
    windows = np.lib.stride_tricks.sliding_window_view(xp, 2 * width)  # windows[i] = input taps of base i
    n_out = math.ceil(len(x) * up / down)
    out = np.empty(n_out, np.float32)
    for p in range(min(up, n_out)):
        count = len(range(p, n_out, up))
        out[p::up] = windows[p * down // up::down][:count] @ bank[p]
    return out

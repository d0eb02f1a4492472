"""The shared resampler: a tone survives with the right length, up and down, at the rates we meet."""

import numpy as np
import pytest

from ttt_speech.dsp import resample


@pytest.mark.parametrize(("rate_in", "rate_out"), [(8000, 24000), (16000, 24000), (22050, 24000), (32000, 24000),
                                                   (24000, 16000)])
def test_resample_keeps_a_tone_and_the_length(rate_in, rate_out):
    x = np.sin(2 * np.pi * 440 * np.arange(rate_in) / rate_in)
    y = resample(x, rate_in, rate_out)
    assert len(y) == rate_out
    ref = np.sin(2 * np.pi * 440 * np.arange(rate_out) / rate_out)
    assert np.abs(y[300:-300] - ref[300:-300]).max() < 1e-3

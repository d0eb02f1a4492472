"""The gibberish detector: synthetic streams whose degradation minute is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttt_speech.eval.gibberish import (
    FLOOR_MINUTES,
    FRAMES_PER_MINUTE,
    PAD_FLOOR,
    GibberishThresholds,
    degraded_minute,
    minute_stats,
    minutes_below_pad_floor,
    repetition_rate,
    uniform_entropy_bits,
)

VOCAB, PAD, END_PAD = 32000, 3, 0


def speech_like(minutes: int, seed: int = 0) -> np.ndarray:
    """Zipf-distributed words (natural text's rank-frequency law) on ~40% of frames, padding elsewhere."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, 5001)
    p = 1.0 / ranks**1.1
    words = 4 + rng.choice(5000, size=minutes * FRAMES_PER_MINUTE, p=p / p.sum())
    return np.where(rng.random(words.shape) < 0.4, words, PAD)


def stats(text: np.ndarray, logprobs: np.ndarray | None = None):
    return minute_stats(text, VOCAB, (PAD, END_PAD), logprobs)


def test_clean_stream_is_never_flagged():
    s = stats(speech_like(6))
    assert degraded_minute(s) is None
    for m in s:
        assert 0.35 < 1 - m.pad_ratio < 0.45 and m.text_tokens > 250
        assert 0.6 < m.uniformity < 0.85  # Zipf text, well under the 0.93 threshold
        assert m.repetition < 0.02


@pytest.mark.parametrize("start", [2, 4])
def test_loop_is_flagged_at_the_minute_it_starts(start):
    text = speech_like(6)
    phrase = text[:40][text[:40] != PAD][:7]  # a 7-word phrase, repeated with its pads from `start` on
    loop = np.tile(np.concatenate([phrase, [PAD] * 9]), 6 * FRAMES_PER_MINUTE // 16 + 1)
    text[start * FRAMES_PER_MINUTE:] = loop[:(6 - start) * FRAMES_PER_MINUTE]
    s = stats(text)
    assert degraded_minute(s) == start
    assert s[start].flags == ["loop"] and s[start].repetition > 0.9
    assert s[start - 1].repetition < 0.02


def test_garbage_is_flagged_at_the_minute_it_starts():
    text = speech_like(5)
    rng = np.random.default_rng(1)
    text[3 * FRAMES_PER_MINUTE:] = rng.integers(4, VOCAB, 2 * FRAMES_PER_MINUTE)  # uniform tokens, no pads
    s = stats(text)
    assert degraded_minute(s) == 3
    assert "garbage" in s[3].flags and s[3].uniformity > 0.98 and s[2].uniformity < 0.85


def test_silence_and_self_perplexity_blowup():
    text = speech_like(4)
    text[2 * FRAMES_PER_MINUTE:3 * FRAMES_PER_MINUTE] = PAD
    s = stats(text)
    assert degraded_minute(s) == 2 and s[2].flags == ["silent"] and s[2].pad_ratio == 1.0
    # the model's own log-probabilities: -1 nat per token, then -4.5 from minute 3 (ppl x e^3.5 = 33x)
    logp = np.full(len(text), -1.0)
    logp[3 * FRAMES_PER_MINUTE:] = -4.5
    s = stats(speech_like(4), logp)
    assert s[0].own_ppl == pytest.approx(math.e)
    assert degraded_minute(s) == 3 and s[3].flags == ["unsure"]
    # thresholds are parameters: a looser one lets it pass
    assert degraded_minute(minute_stats(speech_like(4), VOCAB, (PAD,), logp,
                                        thresholds=GibberishThresholds(max_own_ppl_ratio=40.0))) is None


def test_helpers():
    assert repetition_rate(np.array([1, 2, 3, 4, 1, 2, 3, 4]), n=4) == pytest.approx(1 / 5)
    assert repetition_rate(np.arange(100)) == 0.0
    # 300 draws from 32000 values: about 298.6 distinct
    assert 2 ** uniform_entropy_bits(300, VOCAB) == pytest.approx(298.6, abs=0.1)


def test_minutes_below_the_pad_floor_count_minutes_2_to_9_only():
    pads = [0.0, 0.0, 0.1, 0.149, 0.15, 0.4, None, 0.05, 0.3, 0.14, 0.0, 0.0]  # minutes 0-1 and 10-11 never count
    assert minutes_below_pad_floor(pads) == 4  # minutes 2, 3, 7, 9 (0.15 itself is not below; None not scored)
    assert minutes_below_pad_floor(pads[:4]) == 2  # a shorter run counts the minutes it has
    assert PAD_FLOOR == 0.15 and list(FLOOR_MINUTES) == list(range(2, 10))

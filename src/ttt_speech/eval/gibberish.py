"""Per-minute statistics of a generated text stream, and the rule that says when a run went bad.

Statistics of one minute (750 Moshi frames; for an HF model, a block of the same number of tokens):
- `pad_ratio`: share of positions that are padding (Moshi's text pad / end-of-pad ids). Moshi
  writes text only while it speaks, so this is its silence ratio.
- `entropy_bits`: unigram entropy of the minute's non-pad text tokens.
- `uniformity`: that entropy over the entropy of as many uniform random draws from the
  vocabulary (approximated by log2 of their expected number of distinct values). Natural text is
  Zipf-like, about 0.7-0.85; uniform garbage about 1.0, whatever the sample size.
- `repetition`: share of the minute's non-pad text 4-grams that already occurred earlier in the
  minute. About 0 for text; a loop ("the the the", a repeated phrase) drives it towards 1.
- `own_ppl`: the model's perplexity of the text tokens it sampled (raw logits, temperature 1), when
  the generator recorded it.

The detector flags a minute when any threshold of `GibberishThresholds` is crossed (defaults below,
each a field you can override); the run degrades at the first flagged minute:
- repetition > 0.5 ("loop");
- uniformity > 0.93 with >= 30 non-pad tokens ("garbage");
- pad_ratio > 0.98 ("silent"): a minute with almost no words;
- own_ppl > 3x the first minute's ("unsure"): the model no longer believes its own text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ttt_speech.audio import FRAME_RATE

FRAMES_PER_MINUTE = int(60 * FRAME_RATE)


@dataclass(frozen=True)
class GibberishThresholds:
    """Where a minute stops being speech-like; see the module docstring for why these values."""

    max_repetition: float = 0.5
    max_uniformity: float = 0.93
    min_tokens_for_uniformity: int = 30
    max_pad_ratio: float = 0.98
    max_own_ppl_ratio: float = 3.0
    ngram: int = 4


@dataclass
class MinuteStats:
    """Statistics of one minute of a generated text stream, and what the detector made of them."""

    minute: int
    positions: int
    text_tokens: int  # non-pad tokens
    pad_ratio: float
    entropy_bits: float
    uniformity: float | None  # None: too few tokens to tell
    repetition: float
    own_ppl: float | None
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def entropy_bits(tokens: np.ndarray) -> float:
    if tokens.size == 0:
        return 0.0
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def uniform_entropy_bits(n: int, vocab: int) -> float:
    """About the entropy of n uniform draws from `vocab` values: log2 of their expected distinct count."""
    return math.log2(vocab * -math.expm1(n * math.log1p(-1.0 / vocab))) if n and vocab > 1 else 0.0


def repetition_rate(tokens: np.ndarray, n: int = 4) -> float:
    """Share of the n-grams of `tokens` that occurred before in `tokens`."""
    if len(tokens) < n + 1:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n].tolist())
        repeats += gram in seen
        seen.add(gram)
    return repeats / (len(tokens) - n + 1)


def minute_stats(text: np.ndarray, vocab: int, pad_ids: Sequence[int], logprobs: np.ndarray | None = None,
                 frames_per_minute: int = FRAMES_PER_MINUTE, thresholds: GibberishThresholds | None = None,
                 ) -> list[MinuteStats]:
    """Statistics and flags of each (possibly partial, last) minute of a text stream [T]."""
    th = thresholds or GibberishThresholds()
    text = np.asarray(text)
    out: list[MinuteStats] = []
    first_ppl: float | None = None
    for m, lo in enumerate(range(0, len(text), frames_per_minute)):
        seg = text[lo:lo + frames_per_minute]
        words = seg[~np.isin(seg, list(pad_ids))]
        h = entropy_bits(words)
        ref = uniform_entropy_bits(len(words), vocab)
        uniformity = h / ref if len(words) >= th.min_tokens_for_uniformity and ref > 0 else None
        own_ppl = None
        if logprobs is not None and len(logprobs[lo:lo + frames_per_minute]):
            own_ppl = float(math.exp(-float(np.mean(logprobs[lo:lo + frames_per_minute]))))
        stats = MinuteStats(m, len(seg), len(words), 1.0 - len(words) / len(seg), h, uniformity,
                            repetition_rate(words, th.ngram), own_ppl)
        first_ppl = own_ppl if m == 0 else first_ppl
        stats.flags = flags(stats, first_ppl, th)
        out.append(stats)
    return out


def flags(s: MinuteStats, first_ppl: float | None, th: GibberishThresholds) -> list[str]:
    """Names of the thresholds this minute crosses."""
    out = []
    if s.repetition > th.max_repetition:
        out.append("loop")
    if s.uniformity is not None and s.uniformity > th.max_uniformity:
        out.append("garbage")
    if s.pad_ratio > th.max_pad_ratio:
        out.append("silent")
    if s.own_ppl is not None and first_ppl and s.minute > 0 and s.own_ppl > th.max_own_ppl_ratio * first_ppl:
        out.append("unsure")
    return out


def degraded_minute(stats: list[MinuteStats]) -> int | None:
    """The first flagged minute (0-based), or None for a run that stayed speech-like."""
    return next((s.minute for s in stats if s.flags), None)


# Issue 24's pre-registered floor (docs/results.md section 18): a minute of a free run whose text stream is under
# 15 % pads has stopped pausing (held-out speech: 0.3-0.5), counted over minutes 2-9 (minute 0 holds the prompt)
PAD_FLOOR = 0.15
FLOOR_MINUTES = range(2, 10)


def minutes_below_pad_floor(pad_ratios: Sequence[float | None]) -> int:
    """How many of FLOOR_MINUTES a run's per-minute pad ratios fall below PAD_FLOOR (missing minutes: none)."""
    return sum(1 for m in FLOOR_MINUTES if m < len(pad_ratios) and pad_ratios[m] is not None
               and pad_ratios[m] < PAD_FLOOR)

"""Copy-probe statistics: which tokens each stream group counts, and the bootstrap ratio of pooled means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ttt_speech.eval.copies import GROUPS, ProbeLosses, group_masks, ratio_interval, summarize
from ttt_speech.eval.spans import Span


def test_groups_are_text_words_without_pads_codebook_0_and_the_other_codebooks() -> None:
    tokens = torch.tensor([[3, 17, 0, 42, 3], [5] * 5, [6] * 5, [7] * 5])  # text row: pad, word, end-pad, word, pad
    m = group_masks(tokens, streams=4, pads=(3, 0))
    assert m.shape == (3, 4, 5) and GROUPS == ("text words", "codebook 0", "codebooks 1-7")
    assert m[0].nonzero().tolist() == [[0, 1], [0, 3]]
    assert m[1].nonzero().tolist() == [[1, t] for t in range(5)]
    assert m[2].sum() == 10 and not m[2, :2].any()
    assert group_masks(tokens, streams=1, pads=()).sum((1, 2)).tolist() == [5, 0, 0]  # a flat token stream


def test_probe_losses_pool_each_span_and_group_and_skip_unscored_tokens() -> None:
    tokens = torch.tensor([[3, 9, 9, 3, 9, 9], [1] * 6, [2] * 6])
    losses = torch.tensor([[5.0, 1.0, 2.0, 7.0, 0.5, 0.5], [1.0, 1.0, 1.0, 4.0, 2.0, float("nan")],
                           [3.0, 3.0, 3.0, 1.0, 1.0, 1.0]])
    acc = ProbeLosses.empty()
    acc.add(losses, tokens, Span("first@3", 0, 3), Span("again@3", 3, 6), pads=(3,))
    assert acc.gaps.tolist() == [3]
    assert acc.sums[0].tolist() == [[3.0, 3.0, 9.0], [1.0, 6.0, 3.0]]  # words skip the pads, NaN is not scored
    assert acc.counts[0].tolist() == [[2, 3, 3], [2, 2, 3]]


def test_ratio_is_of_pooled_means_and_its_interval_covers_it() -> None:
    g = np.random.default_rng(0)
    n = 400
    first_c, again_c = g.integers(5, 15, n), g.integers(5, 15, n)
    first_s = first_c * g.normal(2.0, 0.3, n)
    again_s = again_c * g.normal(1.0, 0.3, n)
    r, lo, hi = ratio_interval(again_s, again_c, first_s, first_c)
    assert r == pytest.approx((again_s.sum() / again_c.sum()) / (first_s.sum() / first_c.sum()))
    assert lo < r < hi and 0.47 < lo and hi < 0.53 and hi - lo < 0.05  # 400 probes: ~ +-2 %
    assert ratio_interval(first_s, first_c, first_s, first_c) == (1.0, 1.0, 1.0)
    assert ratio_interval(again_s, np.zeros(n), first_s, first_c) == (None, None, None)


def test_summary_per_gap_with_a_paired_control() -> None:
    probes, control = ProbeLosses.empty(), ProbeLosses.empty()
    tokens = torch.ones(3, 8, dtype=torch.long)
    for gap, again in ((4, 0.5), (4, 0.5), (5, 2.0)):
        first, copy = Span("first", 0, 2), Span("again", gap, gap + 2)
        probes.add(torch.cat([torch.ones(3, gap), torch.full((3, 8 - gap), again)], 1), tokens, first, copy, ())
        control.add(torch.ones(3, 8), tokens, first, copy, ())
    out = summarize(probes, {"replaced": control})
    assert sorted(out) == [4, 5] and out[4]["probes"] == 2 and out[5]["probes"] == 1
    assert out[4]["first"]["codebook 0"] == 1.0 and out[4]["again"]["codebooks 1-7"] == 0.5
    assert out[4]["ratio"]["text words"] == [0.5, 0.5, 0.5] and out[5]["again/replaced"]["codebook 0"] == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="control 'replaced': 1 probes at gap 4, expected 2"):
        summarize(probes, {"replaced": ProbeLosses(control.gaps[1:], control.sums[1:], control.counts[1:])})

"""Per-stream sampling of the server: moshi's distribution (softmax at a temperature, top-k), drawn
from noise that is a function of (seed, frame offset, codebook) only, so a session's tokens do not
depend on the other sessions of its batch and replay exactly after a resume."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech.serve.sampling import sample, stream_uniform  # noqa: E402


def test_sample_follows_softmax_at_temperature_within_top_k() -> None:
    logits = torch.tensor([2.0, 0.5, 1.5, -1.0, 0.0, 1.0, -3.0, 0.3])
    n, temp, k = 40_000, 0.8, 5
    offsets = torch.arange(n)
    tokens = sample(logits.expand(n, -1), temp, k, torch.full((n,), 7), offsets, stream=0)
    top = logits.topk(k).indices
    want = torch.zeros_like(logits)
    want[top] = torch.softmax(logits[top] / temp, dim=0)
    got = torch.bincount(tokens, minlength=len(logits)).float() / n
    assert set(tokens.unique().tolist()) == set(top.tolist())  # never outside the top k
    assert (got - want).abs().max() < 0.01, (got, want)  # 40k draws: 3 sigma is about 0.007
    greedy = sample(logits.expand(3, -1), 0.0, k, torch.zeros(3, dtype=torch.long), offsets[:3], stream=0)
    assert greedy.tolist() == [0, 0, 0]


def test_noise_depends_on_seed_offset_and_stream_only() -> None:
    seed = torch.tensor([11, 11, 11, 12, 2**62 + 11])
    offset = torch.tensor([5, 5, 6, 5, 5])
    u = stream_uniform(seed, offset, stream=1, n=64)
    alone = stream_uniform(seed[:1], offset[:1], stream=1, n=64)
    torch.testing.assert_close(u[:1], alone, rtol=0, atol=0)  # a row does not see its neighbours
    torch.testing.assert_close(u[0], u[1], rtol=0, atol=0)  # same key, same noise
    for row in (2, 3, 4):  # offset, low seed bits, high seed bits each change everything
        assert (u[row] != u[0]).float().mean() > 0.95
    assert (stream_uniform(seed, offset, stream=2, n=64)[0] != u[0]).float().mean() > 0.95
    big = stream_uniform(torch.arange(200), torch.zeros(200, dtype=torch.long), 0, 500)
    assert 0.0 < big.min() and big.max() < 1.0
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002

"""windowed_attention: equal to dense masked attention, segment by segment, with memory linear in T."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_speech.layers import attention
from ttt_speech.layers.attention import windowed_attention


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """The definition: a [T, T] mask, query i sees keys i - window + 1 .. i."""
    T = q.shape[2]
    delta = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(delta >= 0) & (delta < window))


def qkv(T: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, T, 8, generator=g, dtype=torch.float64) for _ in range(3))


@pytest.mark.parametrize("T,window,chunk", [(50, 8, None), (50, 8, 3), (50, 1, None), (37, 64, 5), (64, 16, 16)])
def test_equals_dense_masked_attention(T: int, window: int, chunk: int | None) -> None:
    q, k, v = qkv(T)
    out, past = windowed_attention(q, k, v, window, chunk=chunk)
    assert (out - dense(q, k, v, window)).abs().max() < 1e-12
    assert past[0].shape[2] == min(window - 1, T)
    assert torch.equal(past[0], k[:, :, T - past[0].shape[2]:])


@pytest.mark.parametrize("cuts", [[20, 30], [7, 1, 13, 29], [1] * 10 + [40]])
def test_segments_with_carried_keys_equal_one_pass(cuts: list[int]) -> None:
    q, k, v = qkv(50, seed=1)
    ref = dense(q, k, v, window=8)
    outs, past, at = [], None, 0
    for n in cuts:
        o, past = windowed_attention(q[:, :, at:at + n], k[:, :, at:at + n], v[:, :, at:at + n], 8, past)
        outs.append(o)
        at += n
    assert (torch.cat(outs, dim=2) - ref).abs().max() < 1e-12


def test_scores_per_block_do_not_grow_with_the_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory linear in T: every SDPA call sees at most chunk + window - 1 keys, whatever T is."""
    seen: list[tuple[int, int]] = []
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, *args, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    for T in (64, 1024):
        seen.clear()
        windowed_attention(*qkv(T), window=16, chunk=32)
        assert max(nk for _, nk in seen) == 32 + 16 - 1
        assert sum(nq * nk for nq, nk in seen) <= T * (32 + 16 - 1)


def test_past_longer_than_the_window_is_refused() -> None:
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="at most 7"):
        windowed_attention(q, k, v, 8, past=(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)))

"""In-place fast weights in attention form: every read and write of a run at once, for training.

Unrolling `reference.inplace_chunked` (same notation): frame t reads the start delta and every pair of
an earlier chunk, and the pairs of a chunk that completes in this run are written,

    o_t     = Delta_0 z_t + sum_{tau : c(tau) < c(t)} (z_t . k_tau) v_tau
    Delta'  = Delta_0 + sum_{tau : chunk c(tau) completes} v_tau k_tau^T

where the buffered pairs of the state count as frames of chunk 0 (they sit before `offset`). This is
causal linear attention with a chunk-causal mask over keys of width F. It costs O(T^2 F) and keeps
[T, T] scores for the backward, where the chunk loop keeps one [D, F] delta per chunk: at Moshi-7B
shape (D 4096, F 11264) and T = 2048 frames, 16 MB instead of 32 x 184 MB per stream. Held equal to
the reference (outputs, state and gradients) by tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inplace_parallel(
    q: Tensor, k: Tensor, v: Tensor, delta: Tensor, buf_k: Tensor, buf_v: Tensor, offset: Tensor, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `reference.inplace_chunked`."""
    B, T, _ = q.shape
    C = chunk
    pos = offset[:, None] + torch.arange(T, device=q.device)  # [B, T] position in the stream's chunk grid
    c = pos // C
    end = offset + T
    valid = (torch.arange(C, device=q.device) < offset[:, None])[..., None].to(buf_k.dtype)
    bk, bv = buf_k * valid, buf_v * valid  # buffered pairs: positions < offset of chunk 0

    sees = (c[:, :, None] > c[:, None, :]).to(q.dtype)  # frame t reads pair tau of an earlier chunk
    after0 = (c >= 1).to(q.dtype)[..., None]  # ... and the buffered pairs once past chunk 0
    o = (q @ delta.transpose(1, 2) + ((q @ k.transpose(1, 2)) * sees) @ v
         + ((q @ bk.transpose(1, 2)) * after0) @ bv)

    complete = ((c + 1) * C <= end[:, None]).to(v.dtype)[..., None]  # the pair's chunk ends in this run
    first_done = (end >= C).to(v.dtype).view(B, 1, 1)
    delta = delta + (v * complete).transpose(1, 2) @ k + first_done * (bv.transpose(1, 2) @ bk)

    last = (end // C)[:, None]  # the chunk still open after the run: its pairs are the new buffer
    open_ = (c == last).to(q.dtype)[..., None]
    rows = (pos % C)[..., None]
    still0 = (last == 0).to(q.dtype)[..., None]
    new_k = k.new_zeros(B, C, k.shape[-1]).scatter_add(1, rows.expand_as(k), k * open_) + bk * still0
    new_v = v.new_zeros(B, C, v.shape[-1]).scatter_add(1, rows.expand_as(v), v * open_) + bv * still0
    return o, delta, new_k, new_v, end % C

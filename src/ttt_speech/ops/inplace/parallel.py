"""In-place fast weights in attention form: every read and write of a run at once, for training.

Unrolling `reference.inplace_chunked` (same notation): frame t reads the start delta and every pair of
an earlier chunk, each faded once per chunk end since it was written, and the pairs of a chunk that
completes in this run are written,

    o_t     = lambda^c(t) Delta_0 z_t + sum_{tau : c(tau) < c(t)} lambda^(c(t) - c(tau) - 1) (z_t . k_tau) v_tau
    Delta'  = lambda^n Delta_0 + sum_{tau : chunk c(tau) completes} lambda^(n - c(tau) - 1) v_tau k_tau^T

where n is the number of chunks the run completes and the buffered pairs of the state count as frames
of chunk 0 (they sit before `offset`). This is causal linear attention with a chunk-causal, decaying
mask over keys of width F (RetNet's, per chunk). It costs O(T^2 F) and keeps [T, T] scores for the
backward, where the chunk loop keeps one [D, F] delta per chunk: at Moshi-7B shape (D 4096, F 11264)
and T = 2048 frames, 16 MB instead of 32 x 184 MB per stream. Held equal to the reference (outputs,
state and gradients, d/d lambda included) by tests.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fade(decay: Tensor, chunk_ends: Tensor) -> Tensor:
    """lambda^chunk_ends for the entries a mask keeps; negative counts (masked out) give 1, not an overflow."""
    return decay ** chunk_ends.clamp(min=0).to(decay.dtype)


def inplace_parallel(
    q: Tensor, k: Tensor, v: Tensor, delta: Tensor, buf_k: Tensor, buf_v: Tensor, offset: Tensor, chunk: int,
    decay: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `reference.inplace_chunked`. With lambda = 1 every fade is an exact 1."""
    B, T, _ = q.shape
    C = chunk
    lam = torch.as_tensor(decay, dtype=q.dtype, device=q.device)
    pos = offset[:, None] + torch.arange(T, device=q.device)  # [B, T] position in the stream's chunk grid
    c = pos // C
    end = offset + T
    valid = (torch.arange(C, device=q.device) < offset[:, None])[..., None].to(buf_k.dtype)
    bk, bv = buf_k * valid, buf_v * valid  # buffered pairs: positions < offset of chunk 0

    age = c[:, :, None] - c[:, None, :] - 1  # chunk ends between pair tau's write and frame t's read
    sees = (age >= 0).to(q.dtype) * fade(lam, age)  # frame t reads pair tau of an earlier chunk
    after0 = (c >= 1).to(q.dtype)[..., None] * fade(lam, c - 1)[..., None]  # ... and the buffered pairs past chunk 0
    o = ((q @ delta.transpose(1, 2)) * fade(lam, c)[..., None] + ((q @ k.transpose(1, 2)) * sees) @ v
         + ((q @ bk.transpose(1, 2)) * after0) @ bv)

    n = end // C  # chunks this run completes; the last one (index n - 1) is written unfaded
    complete = ((c + 1) * C <= end[:, None]).to(v.dtype)[..., None]  # the pair's chunk ends in this run
    first_done = (end >= C).to(v.dtype).view(B, 1, 1)
    delta = (delta * fade(lam, n).view(B, 1, 1)
             + (v * complete * fade(lam, n[:, None] - 1 - c)[..., None]).transpose(1, 2) @ k
             + first_done * fade(lam, n - 1).view(B, 1, 1) * (bv.transpose(1, 2) @ bk))

    last = n[:, None]  # the chunk still open after the run: its pairs are the new buffer
    open_ = (c == last).to(q.dtype)[..., None]
    rows = (pos % C)[..., None]
    still0 = (last == 0).to(q.dtype)[..., None]
    new_k = k.new_zeros(B, C, k.shape[-1]).scatter_add(1, rows.expand_as(k), k * open_) + bk * still0
    new_v = v.new_zeros(B, C, v.shape[-1]).scatter_add(1, rows.expand_as(v), v * open_) + bv * still0
    return o, delta, new_k, new_v, end % C

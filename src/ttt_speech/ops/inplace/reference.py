"""Chunked in-place fast weights in plain PyTorch: the definition of the math every other form must equal.

A gated MLP maps x_t to ``z_t = act(W_gate x_t) * (W_up x_t)`` (width F) and then to ``W_down z_t``
(width D). In-place TTT (Feng et al. 2026) makes W_down a fast weight: per stream,
``W_t = W_down + Delta_{c(t)}`` with ``c(t) = floor(t / C)`` the chunk of frame t (positions count
from the start of the stream, chunk length ``C``). Frame t reads

    y_t = W_down z_t + Delta_{c(t)} z_t                  (this module computes o_t = Delta_{c(t)} z_t)

and at the end of chunk c the chunk's pairs are written (apply-then-update: chunk c reads only
what chunks < c wrote, so every pair of chunk c may use anything up to the chunk's last frame):

    Delta_{c+1} = lambda Delta_c + sum_{tau in chunk c} v_tau k_tau^T          Delta_0 = 0

This is one gradient step per chunk on the in-place paper's loss ``-<V, Z Delta^T>_F`` (whose
gradient is ``-V^T Z``); the step size is folded into ``v`` by the caller. The decay ``lambda`` in
(0, 1] (`decay`; 1: none, the in-place paper's rule) fades what earlier chunks wrote once per chunk,
as GLA, RetNet, Mamba-2 and Gated DeltaNet gate their states: with lambda < 1 the delta stays below
``max_c ||sum_chunk v k^T|| / (1 - lambda)`` however long the stream, where lambda = 1 lets it grow
without bound (issue 24: a memory trained on 1536 frames broke past ~4700). It may be a 0-dim
tensor that needs grad (the layer learns it). The layer pairs the key of
frame tau-1 with a value built from frame tau (``k_tau = z_{tau-1}``, see `layers/inplace.py`), so
the memory maps "what the MLP saw" to "what came next", aligned with next-frame prediction.

Since ``Delta_0 = 0``, chunk 0 reads exactly ``W_down z_t``: the pretrained MLP, unchanged.
A stream may be cut anywhere: the carried state is ``(Delta, the current chunk's pairs so far,
offset)``; rows of the pair buffer at or after ``offset`` are ignored. Everything here runs in the
dtype it is given (the layer uses fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor


def inplace_chunked(
    q: Tensor, k: Tensor, v: Tensor, delta: Tensor, buf_k: Tensor, buf_v: Tensor, offset: Tensor, chunk: int,
    decay: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """In-place fast weights over T frames per stream, each stream starting `offset[b]` frames into a chunk.

    q, k: [B, T, F] (queries z_t, keys); v: [B, T, D] (values, step size included); delta: [B, D, F];
    buf_k: [B, C, F], buf_v: [B, C, D] (the current chunk's earlier pairs, rows < offset valid);
    offset: [B] int64 in [0, C); decay: lambda (a float or a 0-dim tensor). Returns (o [B, T, D], delta, buf_k, buf_v, new offset).
    Streams are aligned on a grid of whole chunks: the buffer fills each stream's first rows, the
    new frames follow at their positions, and the rest is zeros (a zero pair writes nothing).
    """
    B, T, _ = q.shape
    C = chunk
    ar = torch.arange(C, device=q.device)
    end = offset + T
    n_chunks = -(-int(end.max()) // C)
    pos = offset[:, None] + torch.arange(T, device=q.device)  # [B, T] grid row of each frame

    def grid(x: Tensor, buf: Tensor) -> Tensor:
        """[B, n_chunks * C + C, W]: valid buffer rows, then x at its rows; one spare chunk of zeros."""
        rows = (n_chunks + 1) * C
        new = x.new_zeros(B, rows, x.shape[-1]).scatter(1, pos[..., None].expand_as(x), x)
        old = buf * (ar < offset[:, None])[..., None].to(buf.dtype)
        return new + torch.cat([old, old.new_zeros(B, rows - C, old.shape[-1])], 1)

    qg, kg, vg = grid(q, torch.zeros_like(buf_k)), grid(k, buf_k), grid(v, buf_v)
    outs = []
    for n in range(n_chunks):
        s = slice(n * C, (n + 1) * C)
        outs.append(qg[:, s] @ delta.transpose(1, 2))
        done = ((n + 1) * C <= end).view(B, 1, 1)  # this stream reached the chunk's last frame
        delta = torch.where(done, decay * delta + vg[:, s].transpose(1, 2) @ kg[:, s], delta)
    o = torch.cat(outs, 1).gather(1, pos[..., None].expand(B, T, delta.shape[1]))
    # the pairs of each stream's unfinished chunk (the spare chunk when it ended on a boundary)
    rows = ((end // C) * C)[:, None] + ar  # [B, C]
    new_k = kg.gather(1, rows[..., None].expand(B, C, kg.shape[-1]))
    new_v = vg.gather(1, rows[..., None].expand(B, C, vg.shape[-1]))
    return o, delta, new_k, new_v, end % C

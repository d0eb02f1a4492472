"""Sliding-window causal attention whose memory grows linearly with the sequence length.

moshi's training forward builds a dense [B, 1, T, T] mask (over 4 GB per layer at 64k frames) and
transformers builds a dense [T, T] sliding-window mask too, so neither reaches long training
sequences. Here queries are cut into blocks; a block of C queries attends to the at most
C + window - 1 keys it can see, so scores and masks take O(T * (C + window)) memory. The keys of
the previous segment (the last window - 1 of them) are passed in, so a long sequence processed
segment by segment sees exactly what one forward over the whole sequence would.

Window semantics are moshi's `context` and transformers' `sliding_window`: the query at position
p sees the keys at positions p - window + 1 ... p (itself included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every SDPA backend but cuDNN's: on an H200 (torch 2.11) its backward failed at batch 128 x 512 frames
# (`mha_graph.execute(...).is_good()`, issue 24); the memory-efficient kernel takes the same masks.
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def windowed_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, past: tuple[Tensor, Tensor] | None = None,
    chunk: int | None = None, scale: float | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Attention of q [B, H, T, D] over [past keys; k] within `window`; returns (out, new past).

    k, v: [B, H, T, D] for the same T positions as q (already rotated; heads already repeated for
    grouped-query attention). past: the (keys, values) of up to window - 1 positions right before
    this segment. chunk: queries per block (default: window). The new past is the last window - 1
    keys/values of [past; k], still attached to the graph (the caller detaches between segments).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if past is not None:
        k, v = torch.cat([past[0].to(k), k], dim=2), torch.cat([past[1].to(v), v], dim=2)
    T, P = q.shape[2], k.shape[2] - q.shape[2]
    if P >= window:
        raise ValueError(f"past holds {P} positions; a window of {window} needs at most {window - 1}")
    block = min(chunk or window, T) if T else 1
    with sdpa_kernel(BACKENDS):
        outs = [_block(q, k, v, s, min(s + block, T), P, window, scale) for s in range(0, T, block)]
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
    keep = min(window - 1, k.shape[2])
    return out, (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:])


def _block(q: Tensor, k: Tensor, v: Tensor, s: int, e: int, P: int, window: int, scale: float | None) -> Tensor:
    """Queries s..e-1 against the keys they can see (P: past positions before the segment)."""
    lo = max(0, P + s - window + 1)  # first key any query of the block can see
    qpos = P + torch.arange(s, e, device=q.device)[:, None]
    kpos = torch.arange(lo, P + e, device=q.device)[None, :]
    delta = qpos - kpos
    mask = (delta >= 0) & (delta < window)
    return F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:P + e], v[:, :, lo:P + e], attn_mask=mask,
                                          scale=scale)

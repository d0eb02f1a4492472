"""A deliberately naive in-place fast weight, straight from the equations: one frame, one stream at a time.

It shares no code with `reference.py`: no grid, no batched matmuls; each stream keeps a Python list
of its chunk's pairs and writes them one outer product at a time when its chunk is full. Slow; for
tests only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inplace_naive(
    q: Tensor, k: Tensor, v: Tensor, delta: Tensor, buf_k: Tensor, buf_v: Tensor, offset: Tensor, chunk: int,
    decay: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `reference.inplace_chunked`."""
    B, T, _ = q.shape
    outs, deltas, keys, values, offsets = [], [], [], [], []
    for b in range(B):
        W = delta[b]
        pairs = [(buf_k[b, i], buf_v[b, i]) for i in range(int(offset[b]))]
        ys = []
        for t in range(T):
            ys.append(torch.mv(W, q[b, t]))  # read with the weights of the chunk's start
            pairs.append((k[b, t], v[b, t]))
            if len(pairs) == chunk:  # the chunk's last frame: fade the old memory, then write its pairs
                W = W * decay
                for kk, vv in pairs:
                    W = W + torch.outer(vv, kk)
                pairs = []
        outs.append(torch.stack(ys))
        deltas.append(W)
        pad = chunk - len(pairs)
        keys.append(torch.stack([p[0] for p in pairs] + [torch.zeros_like(buf_k[b, 0])] * pad))
        values.append(torch.stack([p[1] for p in pairs] + [torch.zeros_like(buf_v[b, 0])] * pad))
        offsets.append(len(pairs))
    return (torch.stack(outs), torch.stack(deltas), torch.stack(keys), torch.stack(values),
            torch.tensor(offsets, dtype=offset.dtype, device=offset.device))

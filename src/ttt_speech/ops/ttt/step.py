"""Streaming TTT step: one token per stream, state updated in place, CUDA-graph capturable.

Primal form of `reference.ttt_chunked` for T = 1: accumulate this token's gradient, read the
output through ``W0 - a * G``, and commit at the end of a mini-batch. No host sync, no Python
branching on tensor values, fixed shapes, so `torch.cuda.CUDAGraph` can replay it; streams whose
`exec_mask` is False keep their state bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ttt_speech.ops.ttt.reference import Residual, gelu, inner_grads, output


@torch.no_grad()
def ttt_step_(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    weights: list[Tensor], grads: list[Tensor], offset: Tensor, mini_batch: int,
    residual: Residual = "q", eps: float = 1e-6, exec_mask: Tensor | None = None,
) -> Tensor:
    """q, k, v: [B, H, 1, D]; a, c: [B, H, 1]. Mutates weights, grads, offset; returns [B, H, 1, D]."""
    B = q.shape[0]
    ln_w, ln_b = ln_w[:, None, :], ln_b[:, None, :]
    xs, gs = inner_grads(k, v, weights, ln_w, ln_b, eps)
    a4, c4 = a[..., None], c[..., None]
    new_grads = []
    for l in range(len(xs)):
        cg = c4 * gs[l]
        new_grads += [grads[2 * l] + xs[l].transpose(-1, -2) @ cg, grads[2 * l + 1] + cg]
    w_bar = [W - a4 * G for W, G in zip(weights, new_grads)]
    z = q
    for l in range(len(xs)):
        z = z @ w_bar[2 * l] + w_bar[2 * l + 1]
        if l < len(xs) - 1:
            z = gelu(z)
    done = (offset == mini_batch - 1).view(B, 1, 1, 1)
    run = torch.ones_like(done) if exec_mask is None else exec_mask.view(B, 1, 1, 1).to(torch.bool)
    for W, G, Wb, Gn in zip(weights, grads, w_bar, new_grads):
        W.copy_(torch.where(run & done, Wb, W))
        G.copy_(torch.where(run, torch.where(done, torch.zeros_like(Gn), Gn), G))
    offset.copy_(torch.where(run.view(B), (offset + 1) % mini_batch, offset))
    return output(q, z, ln_w, ln_b, eps, residual)

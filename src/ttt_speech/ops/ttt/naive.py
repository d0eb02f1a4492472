"""A deliberately naive TTT, straight from the equations: one token at a time, gradients by autograd.

It shares no math with `reference.py` (its own LayerNorm via `F.layer_norm`, its own inner model,
autograd instead of closed-form gradients), so that agreement between the two means something.
Slow; for tests only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ttt_speech.ops.ttt.reference import Residual


def _f_res(x: Tensor, weights: list[Tensor]) -> Tensor:
    """x: [B, H, 1, D]; weights [B, H, Din, Dout] / [B, H, 1, Dout]."""
    for l in range(0, len(weights), 2):
        if l:
            x = F.gelu(x, approximate="tanh")
        x = torch.matmul(x, weights[l]) + weights[l + 1]
    return x


def _per_head_layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """LayerNorm with per-head affine; w, b: [H, D]. torch's own normalisation (not `reference.layer_norm`),
    so that the oracle shares no LayerNorm code with the form it checks."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * w[:, None, :] + b[:, None, :]


def ttt_naive(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    weights: list[Tensor], grads: list[Tensor], offset: Tensor, mini_batch: int,
    residual: Residual = "q", eps: float = 1e-6,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """Same contract as `reference.ttt_chunked`."""
    B, H, T, D = q.shape
    weights, grads, pos = list(weights), list(grads), offset.clone()
    outs = []
    differentiable = torch.is_grad_enabled()
    for t in range(T):
        qt, kt, vt = q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]
        at, ct = a[:, :, t, None, None], c[:, :, t, None, None]
        # gradient of the inner loss at the boundary weights; streams/heads are independent,
        # so the gradient of the sum is each one's own gradient
        with torch.enable_grad():
            w0 = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
            loss = 0.5 * (_per_head_layer_norm(_f_res(kt, w0), ln_w, ln_b, eps) - (vt - kt)).pow(2).sum()
            step_grads = torch.autograd.grad(loss, w0, create_graph=differentiable)
        grads = [G + ct * g for G, g in zip(grads, step_grads)]
        w_bar = [W - at * G for W, G in zip(weights, grads)]
        z = _f_res(qt, w_bar)
        outs.append((qt if residual == "q" else z) + _per_head_layer_norm(z, ln_w, ln_b, eps))
        done = (pos == mini_batch - 1).view(B, 1, 1, 1)
        weights = [torch.where(done, Wb, W) for Wb, W in zip(w_bar, weights)]
        grads = [torch.where(done, torch.zeros_like(G), G) for G in grads]
        pos = (pos + 1) % mini_batch
    return torch.cat(outs, dim=2), weights, grads, pos

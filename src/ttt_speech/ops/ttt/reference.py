"""Chunked (dual-form) TTT in plain PyTorch: the definition of the math every other form must equal.

Notation (per stream b, head h). The inner model is a residual MLP of depth 1 (TTT-Linear) or 2
(TTT-MLP, tanh-GELU between): ``f(x; W) = x + LN(f_res(x; W))``. Token j brings the inner loss
``l_j(W) = 1/2 ||LN(f_res(k_j; W)) - (v_j - k_j)||^2``. Tokens are grouped in mini-batches of
``K`` aligned to absolute stream positions; every gradient of a mini-batch is taken at the weights
``W0`` of its start (the *boundary weights*). With step sizes ``eta[i, j] = a_i * c_j``::

    W_bar_i = W0 - a_i * (G_prev + sum_{j <= i in the mini-batch} c_j * grad l_j(W0))
    z_i     = f_res(q_i; W_bar_i)
    out_i   = q_i + LN(z_i)            (residual="q", ttt-lm)  or  z_i + LN(z_i)  (residual="z", fla)

and at the last position of a mini-batch ``W0 <- W_bar_{K-1}`` and the accumulated gradient
``G`` restarts at zero. ``G_prev`` is what earlier tokens of the *same* mini-batch accumulated, so
a stream may be cut anywhere: the carried state is ``(W0, G, offset)``.

Weights and gradients travel as flat lists ``[W1, b1, (W2, b2)]`` of shapes ``[B, H, Din, Dout]``
and ``[B, H, 1, Dout]``. Everything here runs in fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Residual = Literal["q", "z"]


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Per-head LayerNorm over the last dim; weight/bias broadcast as [H, 1, D]."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * weight + bias


def layer_norm_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2, in closed form (what the dual form needs)."""
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    z_hat = (z - mu) * rstd
    g_hat = (weight * z_hat + bias - target) * weight
    return (d * g_hat - g_hat.sum(-1, keepdim=True) - z_hat * (g_hat * z_hat).sum(-1, keepdim=True)) * rstd / d


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_grad(x: Tensor) -> Tensor:
    """Derivative of tanh-GELU, written out so the inner backward needs no autograd."""
    c = 0.7978845608028654  # sqrt(2 / pi)
    inner = c * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def inner_forward(x: Tensor, weights: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Run f_res, keeping each layer's input `xs[l]` and pre-activation `zs[l]`."""
    xs, zs = [x], []
    depth = len(weights) // 2
    for l in range(depth):
        z = xs[-1] @ weights[2 * l] + weights[2 * l + 1]
        zs.append(z)
        if l < depth - 1:
            xs.append(gelu(z))
    return xs, zs


def inner_grads(
    k: Tensor, v: Tensor, weights: list[Tensor], ln_w: Tensor, ln_b: Tensor, eps: float
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-token gradients w.r.t. each layer's output, at `weights`: (layer inputs, dl/dz)."""
    xs, zs = inner_forward(k, weights)
    g = layer_norm_l2_grad(zs[-1], v - k, ln_w, ln_b, eps)
    gs = [g]
    for l in range(len(zs) - 1, 0, -1):
        g = (g @ weights[2 * l].transpose(-1, -2)) * gelu_grad(zs[l - 1])
        gs.insert(0, g)
    return xs, gs


def output(q: Tensor, z: Tensor, ln_w: Tensor, ln_b: Tensor, eps: float, residual: Residual) -> Tensor:
    return (q if residual == "q" else z) + layer_norm(z, ln_w, ln_b, eps)


def _minibatch(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    weights: list[Tensor], grads: list[Tensor], eps: float,
) -> tuple[Tensor, list[Tensor]]:
    """One mini-batch (or its tail) in dual form: outputs z and the accumulated gradients after it.

    q, k, v: [B, H, K, D]; a, c: [B, H, K] (c is 0 on padding, so padding never teaches).
    """
    xs, gs = inner_grads(k, v, weights, ln_w, ln_b, eps)
    a = a[..., None]
    qin = q
    new_grads: list[Tensor] = []
    causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool, device=q.device).tril()
    for l in range(len(xs)):
        W, b, GW, Gb = weights[2 * l], weights[2 * l + 1], grads[2 * l], grads[2 * l + 1]
        cg = c[..., None] * gs[l]
        # sum_{j<=i} c_j (qin_i . x_j + 1) g_j : the gradient terms seen by query i
        attn = (qin @ xs[l].transpose(-1, -2) + 1.0).masked_fill(~causal, 0.0)
        z = qin @ W + b - a * (qin @ GW + Gb + attn @ cg)
        new_grads += [GW + xs[l].transpose(-1, -2) @ cg, Gb + cg.sum(-2, keepdim=True)]
        qin = gelu(z) if l < len(xs) - 1 else z
    return qin, new_grads


def ttt_chunked(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    weights: list[Tensor], grads: list[Tensor], offset: Tensor, mini_batch: int,
    residual: Residual = "q", eps: float = 1e-6,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    """TTT over a run of T tokens per stream, each stream starting `offset[b]` tokens into a mini-batch.

    q, k, v: [B, H, T, D]; a, c: [B, H, T]; ln_w, ln_b: [H, D]; offset: [B] int64 in [0, K).
    Returns (out [B, H, T, D], boundary weights, accumulated gradients, new offset).
    Streams with different offsets are aligned by scattering into a zero-padded grid whose padding
    has c = 0 (so it contributes nothing) and whose outputs are dropped.
    """
    B, H, T, D = q.shape
    K = mini_batch
    ln_w, ln_b = ln_w[:, None, :], ln_b[:, None, :]
    end = offset + T  # per stream: tokens of the current mini-batch span seen after this run
    n_mb = -(-int(end.max()) // K)
    idx = (offset[:, None] + torch.arange(T, device=q.device))[:, None, :]  # [B, 1, T]

    def grid(x: Tensor) -> Tensor:
        shape = (B, H, n_mb * K) + x.shape[3:]
        i = idx.expand(B, H, T) if x.dim() == 3 else idx[..., None].expand(B, H, T, x.shape[-1])
        return x.new_zeros(shape).scatter(2, i, x)

    qg, kg, vg, ag, cg = (grid(t) for t in (q, k, v, a, c))
    weights, grads = list(weights), list(grads)
    outs = []
    for n in range(n_mb):
        s = slice(n * K, (n + 1) * K)
        z, grads = _minibatch(qg[:, :, s], kg[:, :, s], vg[:, :, s], ag[:, :, s], cg[:, :, s],
                              ln_w, ln_b, weights, grads, eps)
        outs.append(output(qg[:, :, s], z, ln_w, ln_b, eps, residual))
        done = ((n + 1) * K <= end).view(B, 1, 1, 1)  # this stream filled the mini-batch
        a_last = ag[:, :, (n + 1) * K - 1, None, None]
        weights = [torch.where(done, W - a_last * G, W) for W, G in zip(weights, grads)]
        grads = [torch.where(done, torch.zeros_like(G), G) for G in grads]
    out = torch.cat(outs, dim=2).gather(2, idx[..., None].expand(B, H, T, D))
    return out, weights, grads, end % K

"""A deliberately naive Gated DeltaNet: the per-token recurrence, straight from the equations.

Per stream and head, with state ``S`` of shape [Dk, Dv] (keys index rows), for each token t::

    S   <- exp(g_t) * S                       decay first (g_t <= 0)
    u_t  = beta_t * (v_t - S^T k_t)           delta rule: what S still gets wrong about k_t -> v_t
    S   <- S + k_t u_t^T
    o_t  = scale * S^T q_t

This is flash-linear-attention's `naive_recurrent_gated_delta_rule`, in this repo's [B, H, T, D]
layout. It shares no code with `reference.py` (no chunks, no triangular solve), so agreement between
the two means something. Slow; for tests only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gated_delta_naive(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
    scale: float | None = None, l2_norm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.gated_delta_chunked` (without its shape checks)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if l2_norm:
        q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    B, H, T, Dk = k.shape
    scale = Dk**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state.to(dt)
    outs = []
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, :, t]))
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], u)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    return torch.stack(outs, dim=2), S

"""Chunked Gated DeltaNet (Yang et al. 2024) in plain PyTorch: the definition every faster form must equal.

Recurrence (per stream and head; see `naive.py`): ``S <- a_t S; u_t = beta_t (v_t - S^T k_t);
S <- S + k_t u_t^T; o_t = scale S^T q_t`` with ``a_t = exp(g_t)``. Equivalently
``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` -- flash-linear-attention's
`chunk_gated_delta_rule`, in this repo's [B, H, T, D] layout.

Chunked form over C tokens with in-chunk cumulative log-decay ``b_i = g_1 + ... + g_i`` and
``G[i, j] = exp(b_i - b_j)`` (j <= i). Unrolling the recurrence from the chunk's start state S0::

    (I + A) U = beta V - beta exp(b) K S0,     A[i, j] = beta_i G[i, j] k_i.k_j  (j < i)
    O         = scale (exp(b) Q S0 + (Q K^T * G) U)
    S_C       = exp(b_C) S0 + (exp(b_C - b) K)^T U

``(I + A)^{-1}`` is the WY/UT transform; a unit-lower-triangular solve gives it, once per chunk and
independent of S0, so all chunks' solves run batched and only the C-sized state hand-off is
sequential. Only decay *differences* are exponentiated, so nothing overflows. Math runs in fp32
(fp64 when given fp64, for gradcheck); outputs and states come back in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """FLA's `l2norm`: x / sqrt(||x||^2 + eps) over the last dim."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def check_shapes(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None) -> None:
    """Raise ValueError naming the first tensor whose shape disagrees with q's [B, H, T, Dk] and v's Dv."""
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q and v must be [B, H, T, D]; got q {tuple(q.shape)}, v {tuple(v.shape)}")
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    expected = {"k": (B, H, T, Dk), "v": (B, H, T, Dv), "g": (B, H, T), "beta": (B, H, T)}
    got = {"k": k, "v": v, "g": g, "beta": beta}
    if state is not None:
        expected["state"], got["state"] = (B, H, Dk, Dv), state
    for name, shape in expected.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(
                f"gated delta rule: {name} expected shape {shape} (from q [B, H, T, Dk] = {tuple(q.shape)} "
                f"and Dv = {Dv}), got {tuple(got[name].shape)}"
            )


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None,
    scale: float | None, l2_norm: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    """Check, cast to the compute dtype, normalise, default the state and scale."""
    check_shapes(q, k, v, g, beta, state)
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    if l2_norm:
        q, k = l2_normalize(q), l2_normalize(k)
    B, H, _, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state.to(dt)
    return q, k, v, g, beta, S, Dk**-0.5 if scale is None else scale


def gated_delta_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None = None,
    chunk_size: int = 64, scale: float | None = None, l2_norm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gated delta rule over T tokens (any T), from `state`; differentiable in every input.

    q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; g (log-decay, <= 0), beta: [B, H, T];
    state: [B, H, Dk, Dv] or None (zeros). scale defaults to Dk**-0.5; l2_norm normalises q and k
    (FLA's `use_qk_l2norm_in_kernel`). Returns (o [B, H, T, Dv], final state [B, H, Dk, Dv]).
    """
    q, k, v, g, beta, S, scale = _prepare(q, k, v, g, beta, state, scale, l2_norm)
    B, H, T, Dk = q.shape
    Dv, C = v.shape[-1], chunk_size
    if T == 0:
        return v.new_zeros(B, H, 0, Dv), S
    # pad to whole chunks: k = beta = g = 0 leaves the state untouched, padded outputs are dropped
    N = -(-T // C)
    pad = N * C - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)).view(B, H, N, C, -1) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)).view(B, H, N, C) for x in (g, beta))

    b = g.cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(b_i - b_j) on and below the diagonal; -inf above so exp never sees a large positive number
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # strictly below the diagonal
    # WY/UT transform: (I + A)^{-1} applied to beta V and to beta exp(b) K, for all chunks at once
    inv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    u_v = inv @ (beta[..., None] * v)
    w = inv @ ((beta * b.exp())[..., None] * k)
    qk = (q @ k.transpose(-1, -2)) * decay
    q_dec = q * b.exp()[..., None]
    k_dec = k * (b[..., -1:] - b).exp()[..., None]
    a_chunk = b[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    outs = []
    for n in range(N):
        u = u_v[:, :, n] - w[:, :, n] @ S
        outs.append(scale * (q_dec[:, :, n] @ S + qk[:, :, n] @ u))
        S = a_chunk[:, :, n] * S + k_dec[:, :, n].transpose(-1, -2) @ u
    return torch.cat(outs, dim=2)[:, :, :T], S


@torch.no_grad()
def gated_delta_step_(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
    scale: float | None = None, l2_norm: bool = False, exec_mask: Tensor | None = None,
) -> Tensor:
    """One token per stream, `state` updated in place; CUDA-graph friendly (no host sync, no branching
    on values, fixed shapes). Streams whose `exec_mask` is False keep their state bit for bit.

    q, k: [B, H, 1, Dk]; v: [B, H, 1, Dv]; g, beta: [B, H, 1]; state: [B, H, Dk, Dv] in the compute
    dtype (fp32, or fp64). Returns o [B, H, 1, Dv].
    """
    q, k, v, g, beta, S, scale = _prepare(q, k, v, g, beta, state, scale, l2_norm)
    if q.shape[2] != 1:
        raise ValueError(f"gated_delta_step_: expected one token (T = 1), got q {tuple(q.shape)}")
    if state.dtype != S.dtype:
        raise ValueError(f"gated_delta_step_: state must be {S.dtype} to be updated in place, got {state.dtype}")
    kt = k.transpose(-1, -2)  # [B, H, Dk, 1]
    S = g[..., None].exp() * S
    u = beta[..., None] * (v - kt.transpose(-1, -2) @ S)  # [B, H, 1, Dv]
    S = S + kt @ u
    if exec_mask is not None:
        S = torch.where(exec_mask.view(-1, 1, 1, 1).to(torch.bool), S, state)
    state.copy_(S)
    return scale * (q @ S)

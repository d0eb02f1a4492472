"""Fused TTT-Linear streaming step in Triton: one launch per layer instead of ~30 small kernels.

Same contract and math as `step.ttt_step_` for an inner model of depth 1 (which it is tested
against): one program per (stream, head) reads the boundary weights W and the accumulated
gradient G once per pass, in row blocks, and writes them back in place. Graph-capturable: no host
sync, fixed grid. Used by `TTTLayer.step` on CUDA when Triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ttt_speech.ops.ttt.reference import Residual


@triton.jit
def _ttt_linear_step_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, lnw_ptr, lnb_ptr, W_ptr, b_ptr, GW_ptr, Gb_ptr,
    done_ptr, run_ptr, out_ptr, H, eps,
    D: tl.constexpr, BI: tl.constexpr, RESIDUAL_Q: tl.constexpr,
):
    pid = tl.program_id(0)  # = b * H + h
    h = pid % H
    bidx = pid // H
    cols = tl.arange(0, D)
    vec = pid * D + cols
    q = tl.load(q_ptr + vec)
    k = tl.load(k_ptr + vec)
    v = tl.load(v_ptr + vec)
    a = tl.load(a_ptr + pid)
    c = tl.load(c_ptr + pid)
    lnw = tl.load(lnw_ptr + h * D + cols)
    lnb = tl.load(lnb_ptr + h * D + cols)
    b0 = tl.load(b_ptr + vec)
    Gb = tl.load(Gb_ptr + vec)
    done = tl.load(done_ptr + bidx) != 0
    run = tl.load(run_ptr + bidx) != 0
    base = pid * D * D

    # pass 1: z_k = k W + b at the boundary weights
    zk = b0
    for i0 in range(0, D, BI):
        rows = i0 + tl.arange(0, BI)
        Wblk = tl.load(W_ptr + base + rows[:, None] * D + cols[None, :])
        kblk = tl.load(k_ptr + pid * D + rows)
        zk += tl.sum(kblk[:, None] * Wblk, axis=0)

    # gradient of 1/2 ||LN(z_k) - (v - k)||^2 w.r.t. z_k
    mu = tl.sum(zk, axis=0) / D
    xc = zk - mu
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    zhat = xc * rstd
    ghat = (lnw * zhat + lnb - (v - k)) * lnw
    g = (D * ghat - tl.sum(ghat, axis=0) - zhat * tl.sum(ghat * zhat, axis=0)) * rstd / D

    # pass 2: G += c k (x) g; read out through W - a G; commit at the mini-batch end
    Gb_new = Gb + c * g
    b_bar = b0 - a * Gb_new
    z = b_bar
    for i0 in range(0, D, BI):
        rows = i0 + tl.arange(0, BI)
        offs = base + rows[:, None] * D + cols[None, :]
        Wblk = tl.load(W_ptr + offs)
        Gblk = tl.load(GW_ptr + offs)
        kblk = tl.load(k_ptr + pid * D + rows)
        qblk = tl.load(q_ptr + pid * D + rows)
        Gnew = Gblk + c * kblk[:, None] * g[None, :]
        Wbar = Wblk - a * Gnew
        z += tl.sum(qblk[:, None] * Wbar, axis=0)
        tl.store(GW_ptr + offs, tl.where(run, tl.where(done, 0.0, Gnew), Gblk))
        tl.store(W_ptr + offs, tl.where(run & done, Wbar, Wblk))
    tl.store(Gb_ptr + vec, tl.where(run, tl.where(done, 0.0, Gb_new), Gb))
    tl.store(b_ptr + vec, tl.where(run & done, b_bar, b0))

    # output: residual + LN(z)
    mu = tl.sum(z, axis=0) / D
    xc = z - mu
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    ln = xc * rstd * lnw + lnb
    if RESIDUAL_Q:
        out = q + ln
    else:
        out = z + ln
    tl.store(out_ptr + vec, out)


@torch.no_grad()
def ttt_linear_step_triton_(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    weights: list[Tensor], grads: list[Tensor], offset: Tensor, mini_batch: int,
    residual: Residual = "q", eps: float = 1e-6, exec_mask: Tensor | None = None,
) -> Tensor:
    """q, k, v: [B, H, 1, D] fp32; a, c: [B, H, 1]. Mutates weights, grads, offset; returns [B, H, 1, D]."""
    (W, b), (GW, Gb) = weights, grads
    B, H, _, D = q.shape
    if len(weights) != 2 or D & (D - 1) or q.dtype != torch.float32:
        raise ValueError(f"fused step needs TTT-Linear, power-of-two head_dim, fp32; got depth "
                         f"{len(weights) // 2}, head_dim {D}, {q.dtype}")
    for t in (W, b, GW, Gb):
        if not t.is_contiguous():
            raise ValueError("fused step updates the state in place and needs contiguous state tensors")
    done = offset == mini_batch - 1
    run = torch.ones_like(done) if exec_mask is None else exec_mask.to(torch.bool)
    out = torch.empty_like(q)
    _ttt_linear_step_kernel[(B * H,)](
        q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(), c.contiguous(),
        ln_w.contiguous(), ln_b.contiguous(), W, b, GW, Gb, done, run, out, H, eps,
        D=D, BI=min(16, D), RESIDUAL_Q=residual == "q",
    )
    offset.copy_(torch.where(run, (offset + 1) % mini_batch, offset))
    return out

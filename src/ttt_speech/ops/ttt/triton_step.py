"""Fused TTT-Linear streaming step in Triton: one launch per layer (plus a tiny offset update).

The kernel takes the raw projections of one token and does everything `TTTLayer` does around
`step.ttt_step_` (the plain-torch step it is tested against, through the layer): the in-mini-batch
RoPE, the learned step size sigmoid(theta . x + b), the token weights, the inner step on the fp32
state (updated in place), and — for a branch that shares its host attention's projections — the
gated add into the attention's heads: heads + tanh(alpha) * out. One program per (stream, head)
holds that head's W and accumulated gradient in registers, so the state is read once and written
once. Graph-capturable: no host sync, fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass
class StepParams:
    """A TTT-Linear layer's parameters as the fused step reads them (all on the state's device)."""

    lr_weight: Tensor  # [H, C]
    lr_bias: Tensor  # [H]
    rope: tuple[Tensor, Tensor] | None  # cos, sin [mini_batch, D/2] fp32, or None without RoPE
    token_idx: Tensor | None  # ttt-lm: learned offsets of the 1/(i+1) token weights [mini_batch]; None: fla
    ln_w: Tensor  # [H, D]
    ln_b: Tensor  # [H, D]
    gate_alpha: Tensor  # [C], used when mixing into the host's heads
    mini_batch: int
    lr_scale: float  # base_lr / D
    q_scale: float  # fla: D^-0.5 after RoPE; ttt-lm: 1
    eps: float


@triton.jit
def _fused_step_kernel(
    q_ptr, k_ptr, v_ptr, sq, sk, sv, x_ptr, sx, C,
    lrw_ptr, lrb_ptr, cos_ptr, sin_ptr, tok_ptr, lnw_ptr, lnb_ptr,
    W_ptr, b_ptr, GW_ptr, Gb_ptr, off_ptr, run_ptr,
    heads_ptr, sh, gate_ptr, out_ptr, so,
    H, MB, lr_scale, q_scale, eps,
    D: tl.constexpr, BC: tl.constexpr, ROPE: tl.constexpr, TOKEN_ETA: tl.constexpr,
    HAS_MASK: tl.constexpr, MIX: tl.constexpr,
):
    pid = tl.program_id(0)  # = stream * H + head
    hh = pid % H
    bi = pid // H
    cols = tl.arange(0, D)
    pos = tl.load(off_ptr + bi)
    q = tl.load(q_ptr + bi * sq + hh * D + cols).to(tl.float32)
    k = tl.load(k_ptr + bi * sk + hh * D + cols).to(tl.float32)
    v = tl.load(v_ptr + bi * sv + hh * D + cols).to(tl.float32)
    if ROPE:  # interleaved pairs (2i, 2i+1): x[j] cos - x[j^1] sin for even j, + for odd j
        pair = cols ^ 1
        qp = tl.load(q_ptr + bi * sq + hh * D + pair).to(tl.float32)
        kp = tl.load(k_ptr + bi * sk + hh * D + pair).to(tl.float32)
        cs = tl.load(cos_ptr + pos * (D // 2) + cols // 2)
        sn = tl.load(sin_ptr + pos * (D // 2) + cols // 2) * tl.where(cols % 2 == 0, -1.0, 1.0)
        q = q * cs + qp * sn
        k = k * cs + kp * sn
    q = q * q_scale

    # step size: sigmoid(theta_h . x + b_h) * base_lr / D
    acc = tl.zeros([BC], dtype=tl.float32)
    for c0 in range(0, C, BC):
        idx = c0 + tl.arange(0, BC)
        m = idx < C
        xs = tl.load(x_ptr + bi * sx + idx, mask=m, other=0.0).to(tl.float32)
        acc += xs * tl.load(lrw_ptr + hh * C + idx, mask=m, other=0.0).to(tl.float32)
    lr = tl.sigmoid(tl.sum(acc, axis=0) + tl.load(lrb_ptr + hh).to(tl.float32)) * lr_scale
    if TOKEN_ETA:  # ttt-lm: eta = clamp(1/(pos+1) + token_idx[pos], 0) * lr
        a = tl.maximum(1.0 / (pos + 1).to(tl.float32) + tl.load(tok_ptr + pos).to(tl.float32), 0.0)
        c = lr
    else:  # fla: eta = lr
        a = lr
        c = 1.0

    lnw = tl.load(lnw_ptr + hh * D + cols).to(tl.float32)
    lnb = tl.load(lnb_ptr + hh * D + cols).to(tl.float32)
    tile = pid * D * D + cols[:, None] * D + cols[None, :]
    W = tl.load(W_ptr + tile)
    b0 = tl.load(b_ptr + pid * D + cols)

    # gradient of 1/2 ||LN(k W + b) - (v - k)||^2 w.r.t. z = k W + b at the boundary weights
    zk = tl.sum(k[:, None] * W, axis=0) + b0
    mu = tl.sum(zk, axis=0) / D
    xc = zk - mu
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    zhat = xc * rstd
    ghat = (lnw * zhat + lnb - (v - k)) * lnw
    g = (D * ghat - tl.sum(ghat, axis=0) - zhat * tl.sum(ghat * zhat, axis=0)) * rstd / D

    # accumulate c k (x) g, read out through W - a G, commit at the end of the mini-batch
    GW = tl.load(GW_ptr + tile)
    Gb = tl.load(Gb_ptr + pid * D + cols)
    GW_new = GW + c * k[:, None] * g[None, :]
    Gb_new = Gb + c * g
    W_bar = W - a * GW_new
    b_bar = b0 - a * Gb_new
    z = tl.sum(q[:, None] * W_bar, axis=0) + b_bar
    done = pos == MB - 1
    if HAS_MASK:
        run = tl.load(run_ptr + bi) != 0
    else:
        run = True
    tl.store(GW_ptr + tile, tl.where(run, tl.where(done, 0.0, GW_new), GW))
    tl.store(W_ptr + tile, tl.where(run & done, W_bar, W))
    tl.store(Gb_ptr + pid * D + cols, tl.where(run, tl.where(done, 0.0, Gb_new), Gb))
    tl.store(b_ptr + pid * D + cols, tl.where(run & done, b_bar, b0))

    # output: q + LN(z) (ttt-lm) or z + LN(z) (fla)
    mu = tl.sum(z, axis=0) / D
    xc = z - mu
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    ln = xc * rstd * lnw + lnb
    if TOKEN_ETA:
        out = q + ln
    else:
        out = z + ln
    if MIX:  # heads + tanh(alpha) * out, in the heads' dtype (tanh(0) is exactly 0: heads unchanged)
        alpha = tl.load(gate_ptr + hh * D + cols).to(tl.float32)
        gate = 1.0 - 2.0 / (tl.exp(2.0 * alpha) + 1.0)
        base = tl.load(heads_ptr + bi * sh + hh * D + cols).to(tl.float32)
        tl.store(out_ptr + bi * so + hh * D + cols, (base + gate * out).to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + bi * so + hh * D + cols, out)


@triton.jit
def _advance_kernel(off_ptr, run_ptr, B, MB, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < B
    pos = tl.load(off_ptr + i, mask=m, other=0)
    nxt = (pos + 1) % MB
    if HAS_MASK:
        nxt = tl.where(tl.load(run_ptr + i, mask=m, other=0) != 0, nxt, pos)
    tl.store(off_ptr + i, nxt, mask=m)


def num_warps(head_dim: int) -> int:
    """Warps per (stream, head) program: enough threads that W and G ([D, D] fp32 each) fit in registers
    (8 measured fastest at D=128 on an H100, batch 1 and 16, against 4, 16 and 32)."""
    return 8 if head_dim >= 128 else 4


def _rows(t: Tensor, C: int, name: str) -> Tensor:
    """One token per stream as [B, C] rows with unit column stride (a view when possible)."""
    t = t.reshape(t.shape[0], C) if t.dim() == 3 else t
    if t.dim() != 2 or t.shape[1] != C:
        raise ValueError(f"{name}: expected [B, 1, {C}] or [B, {C}], got {list(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


@torch.no_grad()
def ttt_linear_step_fused_(
    q: Tensor, k: Tensor, v: Tensor, x: Tensor, p: StepParams, weights: list[Tensor], grads: list[Tensor],
    offset: Tensor, exec_mask: Tensor | None = None, heads: Tensor | None = None,
) -> Tensor:
    """One token of TTT-Linear from raw projections; mutates weights, grads, offset.

    q, k, v, x (the branch input, for the step size): [B, 1, C] (any float dtype, views of a fused
    projection are fine). Returns the per-head output [B, 1, C] fp32, or, given the host
    attention's `heads` [B, 1, C], heads + tanh(gate_alpha) * output in the heads' dtype.
    """
    (W, b), (GW, Gb) = weights, grads
    B, H, D, _ = W.shape
    C = H * D
    if len(weights) != 2 or D & (D - 1) or W.dtype != torch.float32:
        raise ValueError(f"fused step needs TTT-Linear, power-of-two head_dim, fp32 state; got depth "
                         f"{len(weights) // 2}, head_dim {D}, {W.dtype}")
    for t in (W, b, GW, Gb, offset):
        if not t.is_contiguous():
            raise ValueError("fused step updates the state in place and needs contiguous state tensors")
    q, k, v, x = (_rows(t, C, n) for t, n in ((q, "q"), (k, "k"), (v, "v"), (x, "x")))
    hd = None if heads is None else _rows(heads, C, "heads")
    out = torch.empty(B, C, device=q.device, dtype=torch.float32 if hd is None else hd.dtype)
    run = offset if exec_mask is None else exec_mask.to(torch.bool)  # offset: any pointer, unread
    cos, sin = p.rope if p.rope is not None else (p.ln_w, p.ln_w)
    base = out if hd is None else hd
    _fused_step_kernel[(B * H,)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), x, x.stride(0), C,
        p.lr_weight, p.lr_bias, cos, sin, p.ln_w if p.token_idx is None else p.token_idx, p.ln_w, p.ln_b,
        W, b, GW, Gb, offset, run, base, base.stride(0), p.gate_alpha, out, out.stride(0),
        H, p.mini_batch, p.lr_scale, p.q_scale, p.eps,
        D=D, BC=min(512, triton.next_power_of_2(C)), ROPE=p.rope is not None, TOKEN_ETA=p.token_idx is not None,
        HAS_MASK=exec_mask is not None, MIX=hd is not None, num_warps=num_warps(D),
    )
    _advance_kernel[(1,)](offset, run, B, p.mini_batch, HAS_MASK=exec_mask is not None,
                          BLOCK=triton.next_power_of_2(B))
    return out[:, None]

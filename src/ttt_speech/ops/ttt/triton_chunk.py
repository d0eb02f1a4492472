"""TTT-Linear over whole mini-batches in Triton, forward and backward: the training/prefill kernel.

Same math as `reference.ttt_chunked` (TTT-Linear, eta[i, j] = a_i * c_j, residual "q" or "z", a
fresh mini-batch start), in two sequential launches with one program per (stream, head):

- forward: the fast weights W, b live in registers for the whole sequence. Per mini-batch it takes
  the inner gradients at the boundary weights, the dual-form outputs with their LayerNorm and
  residual, and the update. Nothing of size D x D goes to memory but the final state; it keeps
  only the scaled gradients c * dl/dz ([T, D], like one more activation) for the backward.
- backward: walks the mini-batches in reverse, *reconstructing* each boundary W_n from W_{n+1}
  (W_n = W_{n+1} + a_last k^T Cg, the update undone with the same operands) instead of reading
  per-chunk states, and carries dL/dW in registers beside it. Every gradient — q, k, v, both step
  sizes, the inner LayerNorm, the initial weights — comes out of that one pass; the second-order
  term through the LayerNorm-gradient is written out in closed form.

FLA's `chunk_ttt_linear` stores W per chunk ([T / K, D, D]: 8x the bytes of q) and recomputes
the forward recurrence in its backward; dropping both halves the peak memory of a forward+backward.
The price is that the sequential loop is the only parallelism (B x H programs), so with few of them
it is latency-bound: at B=1, H=32, D=128 it runs 0.70x FLA, at head_dim 64 on par (numbers in
docs/benchmarks.md). `precision` picks the operand type of the D x D products: "bf16" (fast; FLA's
choice), "tf32", or "ieee" fp32 (for tests).
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl
from torch import Tensor

Precision = Literal["bf16", "tf32", "ieee"]


@triton.jit
def _mm(x, y, PREC: tl.constexpr):
    """A product with D x D operands at the chosen precision (fp32 accumulate)."""
    if PREC == "bf16":
        return tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16))
    else:
        return tl.dot(x, y, input_precision=PREC)


@triton.jit
def _small(x, y, PREC: tl.constexpr):
    """The in-mini-batch products ([K, D] x [D, K], [K, K] x [K, D]): fp32 operands, tf32 unless "ieee"."""
    if PREC == "ieee":
        return tl.dot(x, y, input_precision="ieee")
    else:
        return tl.dot(x, y, input_precision="tf32")


@triton.jit
def _normalize(z, eps, D: tl.constexpr):
    """Row-wise (z - mean) * rstd and rstd [K, 1]."""
    mu = tl.sum(z, axis=1)[:, None] / D
    zc = z - mu
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1)[:, None] / D + eps)
    return zc * rstd, rstd


@triton.jit
def _project_out(g, xh, rstd, D: tl.constexpr):
    """rstd * (g - mean(g) - xh * mean(g * xh)): the LayerNorm Jacobian applied to g, row-wise."""
    return rstd * (g - tl.sum(g, axis=1)[:, None] / D - xh * (tl.sum(g * xh, axis=1)[:, None] / D))


@triton.jit
def _program(H, s_b, s_h, s_ab, s_ah):
    """(stream * H + head, head, this program's offset into q/k/v, its offset into a/c)."""
    pid = tl.program_id(0)
    bi = pid // H
    hh = pid % H
    return pid, hh, bi * s_b + hh * s_h, bi * s_ab + hh * s_ah


@triton.jit
def _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, base, abase, t0, s_t, s_at,
                K: tl.constexpr, D: tl.constexpr):
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    rows = base + (t0 + rk)[:, None] * s_t + rd[None, :]
    q = tl.load(q_ptr + rows).to(tl.float32)
    k = tl.load(k_ptr + rows).to(tl.float32)
    v = tl.load(v_ptr + rows).to(tl.float32)
    kT = tl.load(k_ptr + base + (t0 + rk)[None, :] * s_t + rd[:, None]).to(tl.float32)
    a = tl.load(a_ptr + abase + (t0 + rk) * s_at)
    c = tl.load(c_ptr + abase + (t0 + rk) * s_at)
    a_last = tl.load(a_ptr + abase + (t0 + K - 1) * s_at)
    return q, k, v, kT, a, c, a_last


@triton.jit
def _ttt_linear_fwd_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, lnw_ptr, lnb_ptr, W_ptr, b_ptr,
    out_ptr, cg_ptr, NT, H, s_b, s_h, s_t, s_ab, s_ah, s_at, eps,
    K: tl.constexpr, D: tl.constexpr, RES_Q: tl.constexpr, PREC: tl.constexpr,
):
    pid, hh, base, abase = _program(H, s_b, s_h, s_ab, s_ah)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    obase = pid * NT * K * D  # out and cg are contiguous [B, H, T, D]
    W = tl.load(W_ptr + pid * D * D + rd[:, None] * D + rd[None, :])
    b = tl.load(b_ptr + pid * D + rd)[None, :]
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    beta = tl.load(lnb_ptr + hh * D + rd)[None, :]
    causal = rk[:, None] >= rk[None, :]
    q, k, v, kT, a, c, a_last = _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, base, abase, 0, s_t, s_at, K, D)
    for n in range(NT):
        t0 = n * K
        # issue the next mini-batch's loads now: their latency hides behind this one's math
        q1, k1, v1, kT1, a1, c1, a_last1 = _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, base, abase,
                                                        tl.minimum(t0 + K, (NT - 1) * K), s_t, s_at, K, D)
        # inner gradients at the boundary weights: d/dz 1/2 ||LN(kW + b) - (v - k)||^2, scaled by c
        xh, rstd = _normalize(_mm(k, W, PREC) + b, eps, D)
        cg = c[:, None] * _project_out((w * xh + beta - (v - k)) * w, xh, rstd, D)
        # dual form: z_i = q_i W + b - a_i sum_{j <= i} (q_i . k_j + 1) cg_j
        s = tl.where(causal, _small(q, kT, PREC) + 1.0, 0.0)
        z = _mm(q, W, PREC) + b - a[:, None] * _small(s, cg, PREC)
        zh, _ = _normalize(z, eps, D)
        out = w * zh + beta + (q if RES_Q else z)
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        tl.store(out_ptr + chunk, out)
        tl.store(cg_ptr + chunk, cg)
        W -= a_last * _mm(kT, cg, PREC)
        b -= a_last * tl.sum(cg, axis=0)[None, :]
        q, k, v, kT, a, c, a_last = q1, k1, v1, kT1, a1, c1, a_last1
    tl.store(W_ptr + pid * D * D + rd[:, None] * D + rd[None, :], W)
    tl.store(b_ptr + pid * D + rd[None, :], b)


@triton.jit
def _ttt_linear_bwd_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, lnw_ptr, lnb_ptr, W_ptr, b_ptr, cg_ptr, do_ptr, dW_ptr, db_ptr,
    dq_ptr, dk_ptr, dv_ptr, da_ptr, dc_ptr, dlnw_ptr, dlnb_ptr,
    NT, H, s_b, s_h, s_t, s_ab, s_ah, s_at, eps,
    K: tl.constexpr, D: tl.constexpr, RES_Q: tl.constexpr, PREC: tl.constexpr,
):
    pid, hh, base, abase = _program(H, s_b, s_h, s_ab, s_ah)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    obase = pid * NT * K * D  # cg, do and the outputs dq, dk, dv are contiguous [B, H, T, D]
    tbase = pid * NT * K  # da, dc: contiguous [B, H, T]
    square = pid * D * D + rd[:, None] * D + rd[None, :]
    W = tl.load(W_ptr + square)  # the final weights; walked back to each boundary below
    b = tl.load(b_ptr + pid * D + rd)[None, :]
    dW = tl.load(dW_ptr + square)  # dL/d(weights after the current mini-batch)
    db = tl.load(db_ptr + pid * D + rd)[None, :]
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    beta = tl.load(lnb_ptr + hh * D + rd)[None, :]
    dlnw = tl.zeros([D], dtype=tl.float32)
    dlnb = tl.zeros([D], dtype=tl.float32)
    causal = rk[:, None] >= rk[None, :]
    t0 = (NT - 1) * K
    q, k, v, kT, a, c, a_last = _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, base, abase, t0, s_t, s_at, K, D)
    chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
    cg = tl.load(cg_ptr + chunk)
    do = tl.load(do_ptr + chunk)
    for i in range(NT):
        t0 = (NT - 1 - i) * K
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        t1 = tl.maximum(t0 - K, 0)  # prefetch the previous mini-batch (the walk goes backwards)
        q1, k1, v1, kT1, a1, c1, a_last1 = _load_chunk(q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, base, abase,
                                                        t1, s_t, s_at, K, D)
        cg1 = tl.load(cg_ptr + obase + (t1 + rk)[:, None] * D + rd[None, :])
        do1 = tl.load(do_ptr + obase + (t1 + rk)[:, None] * D + rd[None, :])
        W += a_last * _mm(kT, cg, PREC)  # undo this mini-batch's update: W, b are its boundary weights
        b += a_last * tl.sum(cg, axis=0)[None, :]
        # recompute the forward of this mini-batch
        xh, rstd = _normalize(_mm(k, W, PREC) + b, eps, D)
        e = w * xh + beta - (v - k)
        u = e * w
        g = _project_out(u, xh, rstd, D)  # cg / c
        s = tl.where(causal, _small(q, kT, PREC) + 1.0, 0.0)
        scg = _small(s, cg, PREC)
        zh, zrstd = _normalize(_mm(q, W, PREC) + b - a[:, None] * scg, eps, D)
        # output LayerNorm (+ residual)
        dlnw += tl.sum(do * zh, axis=0)
        dlnb += tl.sum(do, axis=0)
        dz = _project_out(do * w, zh, zrstd, D)
        if not RES_Q:
            dz += do
        # z = q W + b - a * (s @ cg)
        dq = _mm(dz, tl.trans(W), PREC)
        if RES_Q:
            dq += do
        p = a[:, None] * dz
        da = -tl.sum(dz * scg, axis=1)
        ds = tl.where(causal, -_small(p, tl.trans(cg), PREC), 0.0)
        dcg = -_small(tl.trans(s), p, PREC)
        dq += _small(ds, k, PREC)
        dk = _small(tl.trans(ds), q, PREC)
        # the update W' = W - a_last k^T cg, b' = b - a_last sum(cg)
        ev = _mm(k, dW, PREC) + db
        dcg -= a_last * ev
        dk -= a_last * _mm(cg, tl.trans(dW), PREC)
        da += tl.where(rk == K - 1, -tl.sum(cg * ev), 0.0)
        # cg = c * g, g = the LayerNorm-l2 gradient at z_k = k W + b with target v - k
        gam = c[:, None] * dcg
        dc = tl.sum(g * dcg, axis=1)
        du = _project_out(gam, xh, rstd, D)
        dxh = du * w * w - rstd * (tl.sum(u * xh, axis=1)[:, None] / D * gam
                                   + u * (tl.sum(gam * xh, axis=1)[:, None] / D))
        dt = -du * w
        dlnw += tl.sum(du * (e + w * xh), axis=0)
        dlnb += tl.sum(du * w, axis=0)
        dzk = _project_out(dxh, xh, rstd, D) - rstd / D * xh * tl.sum(gam * g, axis=1)[:, None]
        dk += _mm(dzk, tl.trans(W), PREC) - dt
        dW += _mm(tl.trans(q), dz, PREC) + _mm(kT, dzk, PREC)
        db += tl.sum(dz, axis=0)[None, :] + tl.sum(dzk, axis=0)[None, :]
        tl.store(dq_ptr + chunk, dq)
        tl.store(dk_ptr + chunk, dk)
        tl.store(dv_ptr + chunk, dt)
        tl.store(da_ptr + tbase + t0 + rk, da)
        tl.store(dc_ptr + tbase + t0 + rk, dc)
        q, k, v, kT, a, c, a_last, cg, do = q1, k1, v1, kT1, a1, c1, a_last1, cg1, do1
    tl.store(dW_ptr + square, dW)
    tl.store(db_ptr + pid * D + rd[None, :], db)
    tl.store(dlnw_ptr + pid * D + rd, dlnw)
    tl.store(dlnb_ptr + pid * D + rd, dlnb)


def supported(head_dim: int, mini_batch: int) -> bool:
    """Power-of-two head_dim >= 16 and mini-batch 16..64 (tl.dot's smallest tile is 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and mini_batch in (16, 32, 64)


def _num_warps(head_dim: int) -> int:
    return 8 if head_dim >= 128 else 4


class _TTTLinearChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, c, ln_w, ln_b, W0, b0, mini_batch: int, residual: str, eps: float,
                precision: str):
        B, H, T, D = q.shape
        W = W0.detach().float().contiguous().clone()
        b = b0.detach().float().contiguous().clone()
        out = torch.empty(B, H, T, D, device=q.device, dtype=torch.float32)
        cg = torch.empty_like(out)
        ln_w, ln_b = ln_w.detach().float().contiguous(), ln_b.detach().float().contiguous()
        _ttt_linear_fwd_kernel[(B * H,)](
            q, k, v, a, c, ln_w, ln_b, W, b, out, cg, T // mini_batch, H, *q.stride()[:3], *a.stride(), eps,
            K=mini_batch, D=D, RES_Q=residual == "q", PREC=precision, num_warps=_num_warps(D))
        ctx.save_for_backward(q, k, v, a, c, ln_w, ln_b, W, b, cg)
        ctx.args = (mini_batch, residual, eps, precision)
        return out, W.clone(), b.clone()

    @staticmethod
    def backward(ctx, dout, dW, db):
        q, k, v, a, c, ln_w, ln_b, W, b, cg = ctx.saved_tensors
        mini_batch, residual, eps, precision = ctx.args
        B, H, T, D = q.shape
        f32 = dict(device=q.device, dtype=torch.float32)
        dout = torch.zeros(B, H, T, D, **f32) if dout is None else dout.float().contiguous()
        dW = torch.zeros_like(W) if dW is None else dW.float().contiguous().clone()
        db = torch.zeros_like(b) if db is None else db.float().contiguous().clone()
        dq, dk, dv = (torch.empty(B, H, T, D, **f32) for _ in range(3))
        da, dc = (torch.empty(B, H, T, **f32) for _ in range(2))
        dlnw, dlnb = (torch.empty(B, H, D, **f32) for _ in range(2))
        _ttt_linear_bwd_kernel[(B * H,)](
            q, k, v, a, c, ln_w, ln_b, W, b, cg, dout, dW, db,
            dq, dk, dv, da, dc, dlnw, dlnb, T // mini_batch, H, *q.stride()[:3], *a.stride(), eps,
            K=mini_batch, D=D, RES_Q=residual == "q", PREC=precision, num_warps=_num_warps(D))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype), dc.to(c.dtype),
                dlnw.sum(0), dlnb.sum(0), dW, db, None, None, None, None)


def ttt_linear_chunked_triton(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    W: Tensor, b: Tensor, mini_batch: int, residual: str = "q", eps: float = 1e-6,
    precision: Precision = "bf16",
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: [B, H, T, D] (fp32 or bf16), T a multiple of `mini_batch`; a, c: [B, H, T]; ln_w, ln_b:
    [H, D]; W: [B, H, D, D], b: [B, H, 1, D] boundary weights at a fresh mini-batch start.

    Returns out [B, H, T, D] fp32 and the weights after the run, all differentiable.
    """
    B, H, T, D = q.shape
    if not supported(D, mini_batch) or T % mini_batch:
        raise ValueError(f"triton TTT-Linear needs a power-of-two head_dim >= 16, mini_batch in (16, 32, 64) "
                         f"and T a multiple of it; got head_dim {D}, mini_batch {mini_batch}, T {T}")
    if precision not in ("bf16", "tf32", "ieee"):
        raise ValueError(f"precision must be 'bf16', 'tf32' or 'ieee', got {precision!r}")
    if q.stride() != k.stride() or q.stride() != v.stride() or q.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    out, W, b = _TTTLinearChunk.apply(q, k, v, a.float().contiguous(), c.float().contiguous(), ln_w, ln_b,
                                      W.reshape(B, H, D, D),
                                      b.reshape(B, H, D), mini_batch, residual, eps, precision)
    return out, W, b.view(B, H, 1, D)

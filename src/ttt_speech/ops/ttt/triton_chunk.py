"""TTT-Linear over whole mini-batches in Triton, forward and backward: the training/prefill kernel.

Same math as `reference.ttt_chunked` (TTT-Linear, eta[i, j] = a_i * c_j, residual "q" or "z", a
fresh mini-batch start). The recurrence over mini-batches is inherently sequential, so each pass is
split into a *sequential* kernel (one program per (stream, head), state in registers) that does only
what the next mini-batch needs, and *parallel* kernels (one program per block of `checkpoint_every`
mini-batches) that do everything else, starting from boundary weights the sequential kernel saved
at each block start:

- forward: the chain takes the inner gradient at the boundary weights and the update (2 products
  per mini-batch) and saves c * dl/dz, the inner LayerNorm's normalized input and rstd; the output
  kernel walks each block from its saved weights for the dual-form outputs.
- backward: a parallel pass through the outputs (dq, and dL/dz, dL/dcg for the chain); the chain
  carries dL/dW back through each update and inner gradient (second-order LayerNorm term in closed
  form) and needs no W at all; a pass with one program per mini-batch does the per-token gradients
  that need no weights (dv, dc, the LayerNorm's, most of dk), and two walks over the blocks add dk's
  terms through (dL/dW)^T and W^T. Per-token work and a D x D state never share a kernel: together
  they spill registers.

Saved per sequence: two [T, D] tensors, rstd and one D x D per block; FLA's `chunk_ttt_linear`
keeps W per chunk ([T / K, D, D]). Per-token tensors handed between passes are bf16 when the
products round to bf16 anyway (`precision="bf16"`, FLA's choice); "tf32" and "ieee" (fp32, for
tests) keep them fp32. Numbers: docs/benchmarks.md.
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
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision=PREC)


@triton.jit
def _small(x, y, PREC: tl.constexpr):
    """The in-mini-batch products ([K, D] x [D, K], [K, K] x [K, D]): fp32 operands, tf32 unless "ieee"."""
    if PREC == "ieee":
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="tf32")


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
def _block(H, NT, s_b, s_h, s_ab, s_ah, K: tl.constexpr, D: tl.constexpr):
    """A parallel pass's program: _program's four, its index along grid axis 1 (a block of mini-batches,
    or one mini-batch in the per-token pass), its offset into the contiguous [B, H, T, D] tensors the
    passes hand each other."""
    pid, hh, base, abase = _program(H, s_b, s_h, s_ab, s_ah)
    return pid, hh, base, abase, tl.program_id(1), pid * NT * K * D


@triton.jit
def _rows(ptr, base, t0, s_t, K: tl.constexpr, D: tl.constexpr):
    """Rows t0 .. t0 + K - 1 of a [T, D] tile, [K, D], in the stored dtype (bf16 halves the registers)."""
    return tl.load(ptr + base + (t0 + tl.arange(0, K))[:, None] * s_t + tl.arange(0, D)[None, :])


@triton.jit
def _cols(ptr, base, t0, s_t, K: tl.constexpr, D: tl.constexpr):
    """The same rows transposed, [D, K] (loaded that way: cheaper than a register transpose)."""
    return tl.load(ptr + base + (t0 + tl.arange(0, K))[None, :] * s_t + tl.arange(0, D)[:, None])


@triton.jit
def _ckpt(ptr, pid, j, NC, D: tl.constexpr):
    """Offsets of saved weights j of program pid, [D, D]."""
    rd = tl.arange(0, D)
    return ptr + (pid * NC + j) * D * D + rd[:, None] * D + rd[None, :]


@triton.jit
def _ckpt_t(ptr, pid, j, NC, D: tl.constexpr):
    """The same weights, transposed (read that way from memory: free)."""
    rd = tl.arange(0, D)
    return ptr + (pid * NC + j) * D * D + rd[None, :] * D + rd[:, None]


@triton.jit
def _inner_grad(k, v, xh, rstd, w, beta, D: tl.constexpr):
    """The LayerNorm-l2 gradient g = dl/dz at z_k = k W + b (target v - k), and e = LN(z_k) - target."""
    e = w * xh + beta - (v.to(tl.float32) - k.to(tl.float32))
    return _project_out(e * w, xh, rstd, D), e


@triton.jit
def _fwd_chain_loads(k_ptr, v_ptr, a_ptr, c_ptr, base, abase, t0, s_t, s_at, K: tl.constexpr, D: tl.constexpr):
    """What the forward's sequential pass reads for the mini-batch at t0: k, k^T, v, c, a_last."""
    return (_rows(k_ptr, base, t0, s_t, K, D), _cols(k_ptr, base, t0, s_t, K, D), _rows(v_ptr, base, t0, s_t, K, D),
            tl.load(c_ptr + abase + (t0 + tl.arange(0, K)) * s_at), tl.load(a_ptr + abase + (t0 + K - 1) * s_at))


@triton.jit
def _bwd_chain_loads(q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, xh_ptr, rstd_ptr, dz_ptr, dcg_ptr, base, abase, obase,
                     tbase, t0, s_t, s_at, K: tl.constexpr, D: tl.constexpr):
    """What the backward's sequential pass reads for the mini-batch at t0, in the stored dtypes:
    q^T, k, k^T, v, xh, dz, dcg, rstd, c, a_last."""
    rk = tl.arange(0, K)
    chunk = obase + (t0 + rk)[:, None] * D + tl.arange(0, D)[None, :]
    return (_cols(q_ptr, base, t0, s_t, K, D), _rows(k_ptr, base, t0, s_t, K, D), _cols(k_ptr, base, t0, s_t, K, D),
            _rows(v_ptr, base, t0, s_t, K, D), tl.load(xh_ptr + chunk), tl.load(dz_ptr + chunk),
            tl.load(dcg_ptr + chunk), tl.load(rstd_ptr + tbase + t0 + rk[:, None]),
            tl.load(c_ptr + abase + (t0 + rk) * s_at), tl.load(a_ptr + abase + (t0 + K - 1) * s_at))


@triton.jit
def _ttt_fwd_chain_kernel(
    k_ptr, v_ptr, a_ptr, c_ptr, lnw_ptr, lnb_ptr, W_ptr, b_ptr, Wc_ptr, bc_ptr, cg_ptr, xh_ptr, rstd_ptr,
    NT, NC, S, H, s_b, s_h, s_t, s_ab, s_ah, s_at, eps,
    K: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """The sequential part of the forward: per mini-batch only what the next one needs."""
    pid, hh, base, abase = _program(H, s_b, s_h, s_ab, s_ah)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    obase = pid * NT * K * D  # cg and xh are contiguous [B, H, T, D], rstd [B, H, T]
    W = tl.load(W_ptr + pid * D * D + rd[:, None] * D + rd[None, :])
    b = tl.load(b_ptr + pid * D + rd)[None, :]
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    beta = tl.load(lnb_ptr + hh * D + rd)[None, :]
    k, kT, v, c, a_last = _fwd_chain_loads(k_ptr, v_ptr, a_ptr, c_ptr, base, abase, 0, s_t, s_at, K, D)
    for n in range(NT):
        t0 = n * K
        if n % S == 0:
            tl.store(_ckpt(Wc_ptr, pid, n // S, NC, D), W)
            tl.store(bc_ptr + (pid * NC + n // S) * D + rd[None, :], b)
        t1 = tl.minimum(t0 + K, (NT - 1) * K)  # issue the next loads now: they land behind this math
        k1, kT1, v1, c1, a_last1 = _fwd_chain_loads(k_ptr, v_ptr, a_ptr, c_ptr, base, abase, t1, s_t, s_at, K, D)
        xh, rstd = _normalize(_mm(k, W, PREC) + b, eps, D)
        g, _ = _inner_grad(k, v, xh, rstd, w, beta, D)
        cg = c[:, None] * g
        W -= a_last * _mm(kT, cg, PREC)
        b -= a_last * tl.sum(cg, axis=0)[None, :]
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        tl.store(cg_ptr + chunk, cg)
        tl.store(xh_ptr + chunk, xh)
        tl.store(rstd_ptr + pid * NT * K + t0 + rk[:, None], rstd)
        k, kT, v, c, a_last = k1, kT1, v1, c1, a_last1
    tl.store(W_ptr + pid * D * D + rd[:, None] * D + rd[None, :], W)
    tl.store(b_ptr + pid * D + rd[None, :], b)


@triton.jit
def _ttt_fwd_out_kernel(
    q_ptr, k_ptr, a_ptr, lnw_ptr, lnb_ptr, Wc_ptr, bc_ptr, cg_ptr, out_ptr,
    NT, NC, S, H, s_b, s_h, s_t, s_ab, s_ah, s_at, eps,
    K: tl.constexpr, D: tl.constexpr, RES_Q: tl.constexpr, PREC: tl.constexpr,
):
    """The outputs, in parallel over blocks of S mini-batches, each from its saved boundary weights."""
    pid, hh, base, abase, j, obase = _block(H, NT, s_b, s_h, s_ab, s_ah, K, D)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    W = tl.load(_ckpt(Wc_ptr, pid, j, NC, D))
    b = tl.load(bc_ptr + (pid * NC + j) * D + rd)[None, :]
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    beta = tl.load(lnb_ptr + hh * D + rd)[None, :]
    causal = rk[:, None] >= rk[None, :]
    for n in range(j * S, tl.minimum(NT, j * S + S)):
        t0 = n * K
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        q, kT, cg = _rows(q_ptr, base, t0, s_t, K, D), _cols(k_ptr, base, t0, s_t, K, D), tl.load(cg_ptr + chunk).to(tl.float32)
        a = tl.load(a_ptr + abase + (t0 + rk) * s_at)
        a_last = tl.load(a_ptr + abase + (t0 + K - 1) * s_at)
        # dual form: z_i = q_i W + b - a_i sum_{j <= i} (q_i . k_j + 1) cg_j
        s = tl.where(causal, _small(q, kT, PREC) + 1.0, 0.0)
        z = _mm(q, W, PREC) + b - a[:, None] * _small(s, cg, PREC)
        zh, _ = _normalize(z, eps, D)
        tl.store(out_ptr + chunk, w * zh + beta + (q.to(tl.float32) if RES_Q else z))
        W -= a_last * _mm(kT, cg, PREC)
        b -= a_last * tl.sum(cg, axis=0)[None, :]


@triton.jit
def _ttt_bwd_out_kernel(
    q_ptr, k_ptr, a_ptr, lnw_ptr, Wc_ptr, bc_ptr, cg_ptr, do_ptr, dq_ptr, dz_ptr, dcg_ptr, da_ptr,
    dlnw_ptr, dlnb_ptr, NT, NC, S, H, s_b, s_h, s_t, s_ab, s_ah, s_at, eps,
    K: tl.constexpr, D: tl.constexpr, RES_Q: tl.constexpr, PREC: tl.constexpr,
):
    """Backward through the outputs, in parallel over blocks: everything that does not need dL/dW.

    Writes dq (final), da (but the update's term), dz = dL/dz of the dual form and dcg = dL/dcg
    through the outputs (both for the sequential pass). Carries W^T: every product then takes its
    operands as they lie (a D x D register transpose per mini-batch costs more than the math).
    """
    pid, hh, base, abase, j, obase = _block(H, NT, s_b, s_h, s_ab, s_ah, K, D)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    Wt = tl.load(_ckpt_t(Wc_ptr, pid, j, NC, D))
    b = tl.load(bc_ptr + (pid * NC + j) * D + rd)[None, :]
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    dlnw = tl.zeros([D], dtype=tl.float32)
    dlnb = tl.zeros([D], dtype=tl.float32)
    causal = rk[:, None] >= rk[None, :]
    for n in range(j * S, tl.minimum(NT, j * S + S)):
        t0 = n * K
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        q, qT = _rows(q_ptr, base, t0, s_t, K, D), _cols(q_ptr, base, t0, s_t, K, D)
        k, kT = _rows(k_ptr, base, t0, s_t, K, D), _cols(k_ptr, base, t0, s_t, K, D)
        cg, cgT, do = tl.load(cg_ptr + chunk).to(tl.float32), _cols(cg_ptr, obase, t0, D, K, D), tl.load(do_ptr + chunk)
        a = tl.load(a_ptr + abase + (t0 + rk) * s_at)
        a_last = tl.load(a_ptr + abase + (t0 + K - 1) * s_at)
        s = tl.where(causal, _small(q, kT, PREC) + 1.0, 0.0)
        scg = _small(s, cg, PREC)
        zh, zrstd = _normalize(tl.trans(_mm(Wt, qT, PREC)) + b - a[:, None] * scg, eps, D)
        # output LayerNorm (+ residual)
        dlnw += tl.sum(do * zh, axis=0)
        dlnb += tl.sum(do, axis=0)
        dz = _project_out(do * w, zh, zrstd, D)
        if not RES_Q:
            dz += do
        # z = q W + b - a * (s @ cg)
        dq = _mm(dz, Wt, PREC)
        if RES_Q:
            dq += do
        ds = tl.where(causal, -_small(a[:, None] * dz, cgT, PREC), 0.0)
        tl.store(dq_ptr + chunk, dq + _small(ds, k, PREC))
        tl.store(dz_ptr + chunk, dz)
        tl.store(dcg_ptr + chunk, -_small(tl.trans(s), a[:, None] * dz, PREC))
        tl.store(da_ptr + pid * NT * K + t0 + rk, -tl.sum(dz * scg, axis=1))
        Wt -= a_last * _mm(cgT, k, PREC)
        b -= a_last * tl.sum(cg, axis=0)[None, :]
    tl.store(dlnw_ptr + (pid * NC + j) * D + rd, dlnw)
    tl.store(dlnb_ptr + (pid * NC + j) * D + rd, dlnb)


@triton.jit
def _ttt_bwd_chain_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, lnw_ptr, lnb_ptr, xh_ptr, rstd_ptr, dW_ptr, db_ptr, dWc_ptr,
    dz_ptr, dcg_ptr, dcg_out_ptr, da_last_ptr, NT, NC, S, H, s_b, s_h, s_t, s_ab, s_ah, s_at,
    K: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """The sequential part of the backward: dL/dW carried back through each update and inner gradient.

    Only what the previous mini-batch needs: no W (the forward saved the inner LayerNorm's
    normalized input and rstd), no per-token gradients but dzk = dL/d(k W + b) (over dcg, in place),
    the full dL/dcg (to `dcg_out`) and the update's da term; dL/dW after every S-th mini-batch's
    start is saved for the dk pass. Loads stay in their stored dtype until used (registers).
    """
    pid, hh, base, abase = _program(H, s_b, s_h, s_ab, s_ah)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    obase = pid * NT * K * D
    tbase = pid * NT * K
    square = pid * D * D + rd[:, None] * D + rd[None, :]
    dW = tl.load(dW_ptr + square)  # dL/d(weights after the current mini-batch)
    db = tl.load(db_ptr + pid * D + rd)[None, :]
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    beta = tl.load(lnb_ptr + hh * D + rd)[None, :]
    qT, k, kT, v, xh, dz, dcg_o, rstd, c, a_last = _bwd_chain_loads(
        q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, xh_ptr, rstd_ptr, dz_ptr, dcg_ptr, base, abase, obase, tbase,
        (NT - 1) * K, s_t, s_at, K, D)
    for i in range(NT):
        n = NT - 1 - i
        t0 = n * K
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        if n % S == 0:
            tl.store(_ckpt(dWc_ptr, pid, n // S, NC, D), dW)
        t1 = tl.maximum(t0 - K, 0)  # prefetch the previous mini-batch (the walk goes backwards)
        qT1, k1, kT1, v1, xh1, dz1, dcg_o1, rstd1, c1, a_last1 = _bwd_chain_loads(
            q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, xh_ptr, rstd_ptr, dz_ptr, dcg_ptr, base, abase, obase, tbase,
            t1, s_t, s_at, K, D)
        x = xh.to(tl.float32)
        g, e = _inner_grad(k, v, x, rstd, w, beta, D)
        u = e * w
        # the update W' = W - a_last k^T cg, b' = b - a_last sum(cg)
        ev = _mm(k, dW, PREC) + db
        dcg = dcg_o.to(tl.float32) - a_last * ev
        tl.store(da_last_ptr + pid * NT + n, -tl.sum(c[:, None] * g * ev))
        # cg = c * g, g = the LayerNorm-l2 gradient at z_k = k W + b with target v - k
        gam = c[:, None] * dcg
        du = _project_out(gam, x, rstd, D)
        dxh = du * w * w - rstd * (tl.sum(u * x, axis=1)[:, None] / D * gam
                                   + u * (tl.sum(gam * x, axis=1)[:, None] / D))
        dzk = _project_out(dxh, x, rstd, D) - rstd / D * x * tl.sum(gam * g, axis=1)[:, None]
        dW += _mm(qT, dz, PREC) + _mm(kT, dzk, PREC)
        db += tl.sum(dz.to(tl.float32), axis=0)[None, :] + tl.sum(dzk, axis=0)[None, :]
        tl.store(dcg_ptr + chunk, dzk)
        tl.store(dcg_out_ptr + chunk, dcg)
        qT, k, kT, v, xh, dz, dcg_o, rstd, c, a_last = qT1, k1, kT1, v1, xh1, dz1, dcg_o1, rstd1, c1, a_last1
    tl.store(dW_ptr + square, dW)
    tl.store(db_ptr + pid * D + rd[None, :], db)


@triton.jit
def _ttt_bwd_token_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, c_ptr, lnw_ptr, lnb_ptr, xh_ptr, rstd_ptr, cg_ptr, dz_ptr,
    dv_ptr, dk_ptr, dc_ptr, dlnw_ptr, dlnb_ptr, NT, H, s_b, s_h, s_t, s_ab, s_ah, s_at,
    K: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """One program per mini-batch: the gradients that need dL/dcg but no D x D state — dv, dc, the
    inner LayerNorm's and dk's terms through the dual form and the target (`dv` holds dL/dcg on
    entry). Kept apart from the walks below so that none of them holds per-token work beside its state.
    """
    pid, hh, base, abase, n, obase = _block(H, NT, s_b, s_h, s_ab, s_ah, K, D)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    t0 = n * K
    chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
    tt = pid * NT * K + t0 + rk
    w = tl.load(lnw_ptr + hh * D + rd)[None, :]
    beta = tl.load(lnb_ptr + hh * D + rd)[None, :]
    q, k, v = _rows(q_ptr, base, t0, s_t, K, D), _rows(k_ptr, base, t0, s_t, K, D), _rows(v_ptr, base, t0, s_t, K, D)
    cgT, dz = _cols(cg_ptr, obase, t0, D, K, D), tl.load(dz_ptr + chunk)
    xh, rstd = tl.load(xh_ptr + chunk).to(tl.float32), tl.load(rstd_ptr + tt[:, None])
    dcg = tl.load(dv_ptr + chunk).to(tl.float32)
    a = tl.load(a_ptr + abase + (t0 + rk) * s_at)
    c = tl.load(c_ptr + abase + (t0 + rk) * s_at)
    g, e = _inner_grad(k, v, xh, rstd, w, beta, D)
    du = _project_out(c[:, None] * dcg, xh, rstd, D)
    tl.store(dlnw_ptr + (pid * NT + n) * D + rd, tl.sum(du * (e + w * xh), axis=0))
    tl.store(dlnb_ptr + (pid * NT + n) * D + rd, tl.sum(du * w, axis=0))
    tl.store(dc_ptr + tt, tl.sum(g * dcg, axis=1))
    tl.store(dv_ptr + chunk, -du * w)
    ds = tl.where(rk[:, None] >= rk[None, :], -_small(a[:, None] * dz, cgT, PREC), 0.0)
    tl.store(dk_ptr + chunk, _small(tl.trans(ds), q, PREC) + du * w)


@triton.jit
def _ttt_bwd_dk_dw_kernel(
    q_ptr, k_ptr, a_ptr, dWc_ptr, cg_ptr, dz_ptr, dzk_ptr, dk_ptr, NT, NC, S, H, s_b, s_h, s_t, s_ab, s_ah, s_at,
    K: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """dk's term through the update, -a_last cg (dL/dW')^T, added to dk in parallel over blocks: walks
    (dL/dW)^T forward from the sequential pass's saved values, undoing one mini-batch's terms per step."""
    pid, hh, base, abase, j, obase = _block(H, NT, s_b, s_h, s_ab, s_ah, K, D)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    dWt = tl.load(_ckpt_t(dWc_ptr, pid, j, NC, D))  # dL/dW after the block's first mini-batch
    for n in range(j * S, tl.minimum(NT, j * S + S)):
        t0 = n * K
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        if n > j * S:  # dL/dW_{n+1} = dL/dW_n - q_n^T dz_n - k_n^T dzk_n
            q, k = _rows(q_ptr, base, t0, s_t, K, D), _rows(k_ptr, base, t0, s_t, K, D)
            dWt -= _mm(_cols(dz_ptr, obase, t0, D, K, D), q, PREC) + _mm(_cols(dzk_ptr, obase, t0, D, K, D), k, PREC)
        a_last = tl.load(a_ptr + abase + (t0 + K - 1) * s_at)
        tl.store(dk_ptr + chunk, tl.load(dk_ptr + chunk).to(tl.float32) - a_last * _mm(tl.load(cg_ptr + chunk), dWt, PREC))


@triton.jit
def _ttt_bwd_dk_kernel(
    k_ptr, a_ptr, Wc_ptr, cg_ptr, dzk_ptr, dk_ptr, NT, NC, S, H, s_b, s_h, s_t, s_ab, s_ah, s_at,
    K: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
):
    """dk += dzk W^T (its last term), in parallel over blocks, walking W^T from the saved boundary weights."""
    pid, hh, base, abase, j, obase = _block(H, NT, s_b, s_h, s_ab, s_ah, K, D)
    rk = tl.arange(0, K)
    rd = tl.arange(0, D)
    Wt = tl.load(_ckpt_t(Wc_ptr, pid, j, NC, D))
    for n in range(j * S, tl.minimum(NT, j * S + S)):
        t0 = n * K
        chunk = obase + (t0 + rk)[:, None] * D + rd[None, :]
        k, cgT = _rows(k_ptr, base, t0, s_t, K, D), _cols(cg_ptr, obase, t0, D, K, D)
        a_last = tl.load(a_ptr + abase + (t0 + K - 1) * s_at)
        tl.store(dk_ptr + chunk, tl.load(dk_ptr + chunk).to(tl.float32) + _mm(tl.load(dzk_ptr + chunk), Wt, PREC))
        Wt -= a_last * _mm(cgT, k, PREC)


def supported(head_dim: int, mini_batch: int) -> bool:
    """Power-of-two head_dim >= 16 and mini-batch 16..64 (tl.dot's smallest tile is 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and mini_batch in (16, 32, 64)


def _scratch_dtype(precision: str) -> torch.dtype:
    """What the passes hand each other per token: bf16 where the products round to it anyway."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _num_warps(head_dim: int) -> int:
    return 8 if head_dim >= 128 else 4


class _TTTLinearChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, c, ln_w, ln_b, W0, b0, mini_batch: int, residual: str, eps: float,
                precision: str, every: int):
        B, H, T, D = q.shape
        NT = T // mini_batch
        NC = -(-NT // every)
        f32 = dict(device=q.device, dtype=torch.float32)
        W = W0.detach().float().contiguous().clone()
        b = b0.detach().float().contiguous().clone()
        Wc, bc = torch.empty(B * H, NC, D, D, **f32), torch.empty(B * H, NC, D, **f32)
        out = torch.empty(B, H, T, D, **f32)
        cg, xh = (torch.empty(B, H, T, D, device=q.device, dtype=_scratch_dtype(precision)) for _ in range(2))
        rstd = torch.empty(B, H, T, **f32)
        ln_w, ln_b = ln_w.detach().float().contiguous(), ln_b.detach().float().contiguous()
        shape = (NT, NC, every, H, *q.stride()[:3], *a.stride())
        const = dict(K=mini_batch, D=D, PREC=precision, num_warps=_num_warps(D))
        _ttt_fwd_chain_kernel[(B * H,)](k, v, a, c, ln_w, ln_b, W, b, Wc, bc, cg, xh, rstd, *shape, eps, **const)
        _ttt_fwd_out_kernel[(B * H, NC)](q, k, a, ln_w, ln_b, Wc, bc, cg, out, *shape, eps,
                                         RES_Q=residual == "q", **const)
        ctx.save_for_backward(q, k, v, a, c, ln_w, ln_b, Wc, bc, cg, xh, rstd)
        ctx.args = (mini_batch, residual, eps, precision, every)
        return out, W, b

    @staticmethod
    def backward(ctx, dout, dW, db):
        q, k, v, a, c, ln_w, ln_b, Wc, bc, cg, xh, rstd = ctx.saved_tensors
        mini_batch, residual, eps, precision, every = ctx.args
        B, H, T, D = q.shape
        NT, NC = T // mini_batch, Wc.shape[1]
        f32 = dict(device=q.device, dtype=torch.float32)
        dout = torch.zeros(B, H, T, D, **f32) if dout is None else dout.float().contiguous()
        dW = torch.zeros(B * H, D, D, **f32) if dW is None else dW.float().contiguous().clone()
        db = torch.zeros(B * H, D, **f32) if db is None else db.float().contiguous().clone()
        dq, dk, dv = (torch.empty(B, H, T, D, device=q.device, dtype=x.dtype) for x in (q, k, v))
        dz, dcg = (torch.empty_like(xh) for _ in range(2))  # dcg: then dzk
        da, dc = (torch.empty(B, H, T, **f32) for _ in range(2))
        da_last = torch.empty(B, H, NT, **f32)
        dWc = torch.empty_like(Wc)
        dlnw, dlnb = (torch.empty(B * H * (NC + NT), D, **f32) for _ in range(2))  # per block, per mini-batch
        tail = B * H * NC
        shape = (NT, NC, every, H, *q.stride()[:3], *a.stride())
        const = dict(K=mini_batch, D=D, PREC=precision, num_warps=_num_warps(D))
        _ttt_bwd_out_kernel[(B * H, NC)](q, k, a, ln_w, Wc, bc, cg, dout, dq, dz, dcg, da, dlnw, dlnb, *shape, eps,
                                         RES_Q=residual == "q", **const)
        _ttt_bwd_chain_kernel[(B * H,)](q, k, v, a, c, ln_w, ln_b, xh, rstd, dW, db, dWc, dz, dcg, dv, da_last,
                                        *shape, **const)  # dv: dL/dcg for now
        # dk is accumulated in place: its dual-form and target terms, the update's, then dzk W^T
        _ttt_bwd_token_kernel[(B * H, NT)](q, k, v, a, c, ln_w, ln_b, xh, rstd, cg, dz, dv, dk, dc,
                                           dlnw[tail:], dlnb[tail:], NT, *shape[3:], **const)
        _ttt_bwd_dk_dw_kernel[(B * H, NC)](q, k, a, dWc, cg, dz, dcg, dk, *shape, **const)
        _ttt_bwd_dk_kernel[(B * H, NC)](k, a, Wc, cg, dcg, dk, *shape, **const)
        da.view(B, H, NT, mini_batch)[..., -1] += da_last
        per_head = [x[:tail].view(B, H, NC, D).sum((0, 2)) + x[tail:].view(B, H, NT, D).sum((0, 2))
                    for x in (dlnw, dlnb)]
        return (dq, dk, dv, da.to(a.dtype), dc.to(c.dtype), *per_head, dW.view(B, H, D, D), db.view(B, H, D),
                None, None, None, None, None)


def ttt_linear_chunked_triton(
    q: Tensor, k: Tensor, v: Tensor, a: Tensor, c: Tensor, ln_w: Tensor, ln_b: Tensor,
    W: Tensor, b: Tensor, mini_batch: int, residual: str = "q", eps: float = 1e-6,
    precision: Precision = "bf16", checkpoint_every: int = 16,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: [B, H, T, D] (fp32 or bf16), T a multiple of `mini_batch`; a, c: [B, H, T]; ln_w, ln_b:
    [H, D]; W: [B, H, D, D], b: [B, H, 1, D] boundary weights at a fresh mini-batch start.
    `checkpoint_every`: mini-batches between the saved boundary weights (the parallel passes' blocks).

    Returns out [B, H, T, D] fp32 and the weights after the run, all differentiable.
    """
    B, H, T, D = q.shape
    if not supported(D, mini_batch) or T % mini_batch:
        raise ValueError(f"triton TTT-Linear needs a power-of-two head_dim >= 16, mini_batch in (16, 32, 64) "
                         f"and T a multiple of it; got head_dim {D}, mini_batch {mini_batch}, T {T}")
    if precision not in ("bf16", "tf32", "ieee"):
        raise ValueError(f"precision must be 'bf16', 'tf32' or 'ieee', got {precision!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if q.stride() != k.stride() or q.stride() != v.stride() or q.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    out, W, b = _TTTLinearChunk.apply(q, k, v, a.float().contiguous(), c.float().contiguous(), ln_w, ln_b,
                                      W.reshape(B, H, D, D), b.reshape(B, H, D), mini_batch, residual, eps,
                                      precision, checkpoint_every)
    return out, W, b.view(B, H, 1, D)

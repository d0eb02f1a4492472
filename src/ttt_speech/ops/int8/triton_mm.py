"""Weight-only int8 matmul in Triton: y[M, N] = x[M, K] @ (codes[N, K] -> x.dtype)^T * scale[N] (+ bias[N]), or
for half-precision x on int8 tensor cores with x in two int8 digits (to 2^-16 of each row's largest |x|).

Why: at Moshi-7B shape a streaming step is memory-bound from batch 1 to 64 (at 64 rows, bf16 weights give ~64
flop per byte against an H200's ~200), so the weight bytes read per step set its time. Torch's paths read more
than the int8 codes: torchao's eager int8 writes a bf16 copy of each weight per call, inductor's code either
fuses the cast into a slow GEMV or rewrites the matmul into `torch._weight_int8pack_mm` (one thread per output,
no tensor cores; docs/benchmarks.md). These kernels load each int8 code once, convert it in registers,
accumulate in fp32 and apply the per-output-channel scale (and bias) once, at the end.

The kernels:
- `_gemv_kernel` (a streaming step at batch 1): one program per (row, BLOCK_N outputs) walks all of K with
  multiply-adds on CUDA cores into a [BLOCK_N, BLOCK_K] fp32 tile, summed once at the end, loading the next K
  tile before multiplying the current one. BLOCK_N of 4-16 gives a 4096-wide layer 256-1024 programs (an H200
  has 132 SMs), and long K tiles keep ~N * BLOCK_K * 2 / 132 bytes (32-64 KB) in flight per SM: about what HBM's
  latency asks for at full bandwidth. Its cost: ~8 instructions per weight in sm_90 SASS (the conversion and
  the fp32 multiply-add), ~5 of them on the 64-per-clock integer pipe: near HBM's time, not far below it.
- `_dot_kernel` (any M): [BLOCK_M, BLOCK_N] tiles on tensor cores (tl.dot), BLOCK_M 16 / 32 / 64 by M (tl.dot's
  smallest tile is 16: rows past M are masked and wasted), the codes converted to x's dtype per tile (~1.6
  integer-pipe instructions per weight), cp.async-pipelined. Configs with a ROW_TILE below that cover M with
  several row tiles, the programs of one codes tile side by side (the codes come from HBM once, then L2): at
  64 rows the 64-row tiles ran at 1.0-1.5 TB/s on the H200 where 16 rows ran near 3.3 (docs/benchmarks.md).
- the same kernel split over K ("splitk", SPLIT_K 2-8 programs per output tile, fp32 partial sums added
  atomically into a zeroed fp32 buffer, then cast): a 4096-wide output at 64 rows is only 32-128 tiles for 132 SMs,
  too few programs to keep HBM busy; splitting K multiplies them, for a memset and a cast per call.
- `_digits_kernel` + `_digits_dot_kernel` ("digits", and "digitsk" split over K; half-precision x only): x's rows
  in two int8 digits (`naive.int8_digits_naive`: x to 2^-16 of its row's largest |x|, finer than bf16 keeps the
  elements near it), then both digits against the same codes tile on the int8 tensor cores (int32 sums, exact):
  the codes go to the tensor cores as they are read, no conversion in the main loop, which is what held the tiles
  back at 48-64 rows (docs/benchmarks.md). Two launches: the digits kernel is one program per row, the row read
  once into registers (read in steps, each load waited for, it cost ~1.4 µs per 1024 of K); split over K, it also
  zeroes the fp32 sums and tile counters the splits meet at, and the last split of a tile stores y (no memset or
  cast launch, unlike "splitk").
Each has a handful of autotuned configs (tile sizes, warps, pipeline stages, splits), keyed on N, K (and the
kernel's rows bucket and the dtypes), timed briefly at the first call of a shape, each replayed from a CUDA graph
after an L2 flush (`_quick_bench`); the autotuned kernels (the GEMV only up to GEMV_MAX_M rows, the digits only for
half-precision x) are then timed against each other the same way and the fastest kept for that shape. That first
call must not be inside a CUDA graph capture (moshi's streaming runs its first step eagerly, so the capture after
it only launches; a shape first met inside a capture runs the tile kernel's first config, untimed, rather than
break the capture). Under Triton's CPU interpreter nothing is timed: the tile kernel's first config runs (tests
pick each kernel and config in turn).
"""

from __future__ import annotations

import typing as tp
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from ttt_speech.ops.int8.naive import LO
from ttt_speech.ops.triton_env import TRITON_INTERPRET

_LO: tl.constexpr = tl.constexpr(LO)

GEMV_MAX_M = 4  # rows up to which the CUDA-core GEMV is timed against the tensor-core kernel at a shape's first call


def _config(block_n: int, block_k: int, warps: int, stages: int, **more: tp.Any) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, **more}, num_warps=warps, num_stages=stages)


# Few on purpose: each is compiled once per specialisation and timed at every new (N, K) (a Moshi step has ~10).
GEMV_CONFIGS = [_config(8, 1024, 4, 1), _config(16, 512, 4, 1), _config(4, 2048, 4, 1), _config(16, 1024, 8, 1)]
# SWAP: the weight tile is the MMA's A operand (W x^T): its rows fill the tensor cores' 64-row side, the few x rows
# their narrow side, and converted codes stay in registers; unswapped, x is A and the converted codes go to B.
DOT_CONFIGS = [_config(32, 256, 4, 4, SWAP=False), _config(16, 256, 4, 4, SWAP=False),
               _config(64, 128, 4, 4, SWAP=False), _config(64, 256, 8, 3, SWAP=False),
               _config(64, 256, 4, 3, SWAP=True), _config(128, 128, 8, 3, SWAP=True),
               _config(64, 128, 4, 4, SWAP=False, ROW_TILE=16), _config(32, 256, 4, 4, SWAP=False, ROW_TILE=16),
               _config(64, 128, 4, 4, SWAP=False, ROW_TILE=32)]
# split over K: for the few output tiles of a 1024-4096-wide layer at 16-64 rows (the serving batches)
SPLITK_CONFIGS = [_config(64, 128, 4, 4, SWAP=False, SPLIT_K=4), _config(32, 256, 4, 3, SWAP=False, SPLIT_K=4),
                  _config(64, 256, 4, 3, SWAP=True, SPLIT_K=2), _config(64, 128, 4, 4, SWAP=True, SPLIT_K=4),
                  _config(128, 128, 8, 3, SWAP=True, SPLIT_K=4), _config(64, 128, 4, 4, SWAP=True, SPLIT_K=8)]
# x in two int8 digits on the int8 tensor cores (the codes go to them unconverted); 16-64 outputs a program for the
# 4096-wide layers' few tiles, SWAP for the narrow row buckets
DIGITS_CONFIGS = [_config(32, 256, 4, 4, SWAP=False), _config(64, 256, 4, 4, SWAP=False),
                  _config(64, 128, 4, 4, SWAP=False), _config(128, 128, 4, 4, SWAP=False),
                  _config(128, 256, 8, 3, SWAP=False), _config(64, 256, 4, 4, SWAP=True),
                  _config(128, 128, 4, 4, SWAP=True)]
# ... split over K: wide output tiles (each program rereads all of x's digits it multiplies: 64 rows x K x 2 bytes
# from L2 per BLOCK_N outputs) and still enough programs for 132 SMs
DIGITSK_CONFIGS = [_config(128, 128, 4, 4, SWAP=False, SPLIT_K=4), _config(256, 128, 8, 3, SWAP=False, SPLIT_K=4),
                   _config(128, 256, 8, 3, SWAP=False, SPLIT_K=2), _config(64, 256, 4, 4, SWAP=False, SPLIT_K=4),
                   _config(128, 128, 4, 4, SWAP=True, SPLIT_K=4), _config(64, 128, 4, 4, SWAP=False, SPLIT_K=8),
                   _config(64, 256, 4, 4, SWAP=False, SPLIT_K=2)]
DIGITS_ROW = 16384  # the digits kernel holds rows up to this long in registers (a program per row); longer: steps


def _quick_bench(fn: tp.Callable[[], tp.Any], quantiles: tp.Sequence[float] | None = None,
                 return_mode: str = "mean") -> tp.Any:
    """Autotuning's and the race's timer: `fn` as moshi's step runs it, captured once in a CUDA graph (after an
    eager call that compiles and loads it) and replayed after Triton's L2 flush, 5 + 20 ms (a call takes
    microseconds). Why a graph: timed eagerly, our kernels' Python launch outlasts a 5-20 µs kernel (the race once
    kept a kernel 1.4x slower, docs/benchmarks.md), and the digits route launches twice. Off CUDA (the CPU tests'
    stand-in timer) `fn` is timed as it is."""
    if torch.cuda.is_available():
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls stay legal
            fn()
        fn = graph.replay
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles, return_mode=return_mode)


def _median_ms(fn: tp.Callable[[], tp.Any]) -> float:
    """The kernels' race's timer: one number (do_bench given one quantile returns a float, not a list)."""
    return float(_quick_bench(fn, return_mode="median"))


_DOT_META = {
    # every split's K range a whole number of tiles: no masks (a config without SPLIT_K is one split)
    "EVEN_K": lambda args: args["K"] % (args["BLOCK_K"] * args.get("SPLIT_K", 1)) == 0,
    # the row tile: the rows' bucket (16 / 32 / 64, the autotuning key), or a config's smaller ROW_TILE
    "BLOCK_M": lambda args: min(args["ROWS"], args.get("ROW_TILE", 64)),
}


@triton.jit
def _load(ptrs, inside, EVEN_K: tl.constexpr):
    """A tile of one K step: unmasked when BLOCK_K divides K, else zeros past K (they add nothing)."""
    if EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=inside, other=0)
    return tile


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)  # rows first: programs that read the same codes run side by side (L2)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + row * stride_xm + rk * stride_xk
    w_ptrs = w_ptr + (rn % N)[:, None] * stride_wn + rk[None, :] * stride_wk  # rows past N reread row n % N
    x = tl.load(x_ptrs, mask=rk < K, other=0.0)
    w = tl.load(w_ptrs, mask=(rk < K)[None, :], other=0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
        # the next tile's loads are issued before this one's math: two tiles in flight per program (Triton does
        # not pipeline loads that feed no tl.dot); past K they are masked off and read nothing
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        ahead = k0 + rk < K
        x_next = tl.load(x_ptrs, mask=ahead, other=0.0)
        w_next = tl.load(w_ptrs, mask=ahead[None, :], other=0)
        # int8 -> x's dtype first: exact, and Triton converts int8 to bf16 / fp16 with integer ops (prmt + sub)
        # where int8 -> fp32 is a 16-per-clock conversion; bf16 / fp16 -> fp32 is a shift
        acc += w.to(x_ptr.dtype.element_ty).to(tl.float32) * x.to(tl.float32)[None, :]
        x, w = x_next, w_next
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _mma(a, b, acc, FP32: tl.constexpr):
    if FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")  # fp32 models get fp32 products, not tf32
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _scaled(acc, s_ptr, b_ptr, rn, N, HAS_BIAS: tl.constexpr):
    """An fp32 tile [BLOCK_M, BLOCK_N] times the per-channel scale, plus the bias once (by the first split of K:
    scaling each split's sum scales their total)."""
    acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(tl.program_id(2) == 0, bias, 0.0)[None, :]
    return acc


@triton.jit
def _store(acc, s_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The tile kernels' epilogue: the scaled tile stored in y's dtype; split over K, added into the zeroed fp32 y."""
    acc = _scaled(acc, s_ptr, b_ptr, rn, N, HAS_BIAS)
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])
    else:
        # relaxed: ordered by the cast launched after this kernel (acq_rel, Triton's default, fences every add)
        tl.atomic_add(y_ptrs, acc, mask=(rm < M)[:, None] & (rn < N)[None, :], sem="relaxed")


@triton.heuristics(_DOT_META)
@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_M: tl.constexpr, FP32: tl.constexpr, SWAP: tl.constexpr,
                SPLIT_K: tl.constexpr = 1, ROW_TILE: tl.constexpr = 64):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row tiles first: they share the codes' tile (L2)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # this program's share of K: whole tiles, the last split shorter (or empty: it adds zeros)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = tl.program_id(2) * k_per
    k_end = tl.minimum(K, k_start + k_per)
    rk = tl.arange(0, BLOCK_K)
    # rows past M / N reread a valid row (their results are never stored): the loads need no row mask
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + (k_start + rk)[None, :] * stride_xk
    w_ptrs = w_ptr + (rn % N)[:, None] * stride_wn + (k_start + rk)[None, :] * stride_wk
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        inside = (k0 + rk < k_end)[None, :]
        x = _load(x_ptrs, inside, EVEN_K)
        w = _load(w_ptrs, inside, EVEN_K).to(x_ptr.dtype.element_ty)  # exact: int8 is a bf16 / fp16 / fp32 value
        if SWAP:
            acc = _mma(w, tl.trans(x), acc, FP32)
        else:
            acc = _mma(x, tl.trans(w), acc, FP32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if SWAP:
        acc = tl.trans(acc)
    _store(acc, s_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _digit_pair(x, unit, inv):
    """x (fp32) -> its high and low digits: x ~ unit * (high + low / LO)."""
    high = tl.clamp(tl.floor(x * inv + 0.5), -127.0, 127.0)
    low = tl.clamp(tl.floor((x - high * unit) * inv * _LO + 0.5), -127.0, 127.0)
    return high.to(tl.int8), low.to(tl.int8)


@triton.jit
def _digits_kernel(x_ptr, d_ptr, u_ptr, p_ptr, c_ptr, M, N, K, T, stride_xm, stride_xk, BLOCK_K: tl.constexpr,
                   WHOLE: tl.constexpr, ZERO: tl.constexpr):
    """One row of x -> its two int8 digits (d[0, row], d[1, row]) and unit (`naive.int8_digits_naive`). A NaN in
    the row makes its unit NaN (so its outputs, as the exact kernels'): the GPU's max would drop it.
    WHOLE (BLOCK_K >= K, rows up to DIGITS_ROW): the row is read once and stays in registers; else in BLOCK_K steps,
    twice (each step's load waits on the last: ~0.7 µs a step on the H200, so one step is what rows should take).
    ZERO (the split digits route): also zeroes row `row` of the fp32 sums p [M, N] and its share of the T tile
    counters c, which the dot kernel after it adds into: no memset launch."""
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    if ZERO:
        for n0 in range(0, N, BLOCK_K):
            tl.store(p_ptr + row * N + n0 + rk, tl.zeros((BLOCK_K,), tl.float32), mask=n0 + rk < N)
        for t0 in range(row * BLOCK_K, T, M * BLOCK_K):
            tl.store(c_ptr + t0 + rk, tl.zeros((BLOCK_K,), tl.int32), mask=t0 + rk < T)
    levels = tl.full([], 127.0, tl.float32)
    if WHOLE:
        x = tl.load(x_ptr + row * stride_xm + rk * stride_xk, mask=rk < K, other=0.0).to(tl.float32)
        top = tl.reduce(tl.abs(x), 0, _max_nan)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + (k0 + rk) * stride_xk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = _max_nan(amax, tl.abs(x))
        top = tl.reduce(amax, 0, _max_nan)
    unit = tl.div_rn(top, levels)
    inv = tl.where(top > 0, tl.div_rn(levels, tl.where(top > 0, top, levels)), 0.0)  # an all-zero row: digits 0
    tl.store(u_ptr + row, unit)
    if WHOLE:
        high, low = _digit_pair(x, unit, inv)
        tl.store(d_ptr + row * K + rk, high, mask=rk < K)
        tl.store(d_ptr + (M + row) * K + rk, low, mask=rk < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            inside = k0 + rk < K
            x = tl.load(x_ptr + row * stride_xm + (k0 + rk) * stride_xk, mask=inside, other=0.0).to(tl.float32)
            high, low = _digit_pair(x, unit, inv)
            tl.store(d_ptr + row * K + k0 + rk, high, mask=inside)
            tl.store(d_ptr + (M + row) * K + k0 + rk, low, mask=inside)


@triton.jit
def _add_last_stores(acc, p_ptr, c_ptr, y_ptr, rm, rn, M, N, stride_ym, SPLIT_K: tl.constexpr):
    """Split over K in one launch: each split adds its scaled tile into the fp32 sums p (zeroed by the digits
    kernel), then counts itself in at the tile's counter; the split that arrives last reads the total back from L2,
    stores it in y's dtype and resets the counter (autotuning reruns this kernel alone). No memset, no cast launch.
    The ordering is CUTLASS's split-K semaphore: every thread's adds issued (barrier), then one release-acquire
    increment; relaxed adds elsewhere."""
    inside = (rm < M)[:, None] & (rn < N)[None, :]
    p_ptrs = p_ptr + rm[:, None] * N + rn[None, :]
    tl.atomic_add(p_ptrs, acc, mask=inside, sem="relaxed")
    tl.debug_barrier()
    counter = c_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
        total = tl.load(p_ptrs, mask=inside, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], total.to(y_ptr.dtype.element_ty), mask=inside)
        tl.atomic_xchg(counter, 0)


@triton.heuristics(_DOT_META)
@triton.jit
def _digits_dot_kernel(d_ptr, u_ptr, w_ptr, s_ptr, b_ptr, p_ptr, c_ptr, y_ptr, M, N, K, stride_wn, stride_wk,
                       stride_ym, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, SWAP: tl.constexpr,
                       SPLIT_K: tl.constexpr = 1):
    """y = (high @ codes^T * unit + low @ codes^T * unit / LO) * scale (+ bias): both digits against the same
    codes tile on the int8 tensor cores (int32 sums, exact), no conversion of the codes. Split over K, the splits
    meet in `_add_last_stores` (p, c: the fp32 sums and tile counters; unused whole-K)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = tl.program_id(2) * k_per
    k_end = tl.minimum(K, k_start + k_per)
    rk = tl.arange(0, BLOCK_K)
    hi_ptrs = d_ptr + (rm % M)[:, None] * K + (k_start + rk)[None, :]  # rows past M / N reread a valid row
    lo_ptrs = hi_ptrs + M * K
    w_ptrs = w_ptr + (rn % N)[:, None] * stride_wn + (k_start + rk)[None, :] * stride_wk
    if SWAP:
        acc_hi = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_lo = tl.zeros_like(acc_hi)
    for k0 in range(k_start, k_end, BLOCK_K):
        inside = (k0 + rk < k_end)[None, :]
        hi = _load(hi_ptrs, inside, EVEN_K)
        lo = _load(lo_ptrs, inside, EVEN_K)
        w = _load(w_ptrs, inside, EVEN_K)
        if SWAP:
            acc_hi = tl.dot(w, tl.trans(hi), acc_hi, out_dtype=tl.int32)
            acc_lo = tl.dot(w, tl.trans(lo), acc_lo, out_dtype=tl.int32)
        else:
            acc_hi = tl.dot(hi, tl.trans(w), acc_hi, out_dtype=tl.int32)
            acc_lo = tl.dot(lo, tl.trans(w), acc_lo, out_dtype=tl.int32)
        hi_ptrs += BLOCK_K
        lo_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if SWAP:
        acc_hi, acc_lo = tl.trans(acc_hi), tl.trans(acc_lo)
    unit = tl.load(u_ptr + rm % M)[:, None]
    acc = acc_hi.to(tl.float32) * unit + acc_lo.to(tl.float32) * (unit / _LO)
    if SPLIT_K == 1:
        _store(acc, s_ptr, b_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS, SPLIT_K)
    else:
        _add_last_stores(_scaled(acc, s_ptr, b_ptr, rn, N, HAS_BIAS), p_ptr, c_ptr, y_ptr, rm, rn, M, N, stride_ym,
                         SPLIT_K)


_TUNED = {
    "gemv": triton.autotune(GEMV_CONFIGS, key=["N", "K"], do_bench=_quick_bench)(_gemv_kernel),
    "dot": triton.autotune(DOT_CONFIGS, key=["N", "K", "ROWS"], do_bench=_quick_bench)(_dot_kernel),
    # each timed run adds into the fp32 buffer: zeroed before every one
    "splitk": triton.autotune(SPLITK_CONFIGS, key=["N", "K", "ROWS"], do_bench=_quick_bench,
                              reset_to_zero=["y_ptr"])(_dot_kernel),
    "digits": triton.autotune(DIGITS_CONFIGS, key=["N", "K", "ROWS"], do_bench=_quick_bench)(_digits_dot_kernel),
    "digitsk": triton.autotune(DIGITSK_CONFIGS, key=["N", "K", "ROWS"], do_bench=_quick_bench,
                               reset_to_zero=["p_ptr"])(_digits_dot_kernel),
}
_RAW = {"gemv": (_gemv_kernel, GEMV_CONFIGS), "dot": (_dot_kernel, DOT_CONFIGS),
        "splitk": (_dot_kernel, SPLITK_CONFIGS), "digits": (_digits_dot_kernel, DIGITS_CONFIGS),
        "digitsk": (_digits_dot_kernel, DIGITSK_CONFIGS)}
Kernel = tp.Literal["gemv", "dot", "splitk", "digits", "digitsk"]
BUFFERED: set[str] = {"splitk"}  # adds into an fp32 buffer zeroed before it, cast after (digitsk stores y itself)
DIGITS: set[str] = {"digits", "digitsk"}  # kernels that take x's two int8 digits
_timed: dict[tuple, triton.Config] = {}  # (kernel, N, K, rows bucket, dtypes) -> the config autotuning kept there
_faster: dict[tuple, Kernel] = {}  # (N, K, rows, dtypes) -> the kernel timed fastest there
untuned: set[tuple] = set()  # shapes first met inside a CUDA graph capture: captured with an untimed kernel / config


def _capture_untuned(what: tuple) -> None:
    """Say once per shape that a capture baked in an untimed launch: a graph replays it at that speed for good."""
    if what not in untuned and not TRITON_INTERPRET:
        untuned.add(what)
        warnings.warn(f"int8 triton: {what} first ran inside a CUDA graph capture, so the graph keeps an untuned "
                      "launch; run one eager step at this batch before capturing", stacklevel=3)


def block_m(rows: int) -> int:
    """The tensor-core kernel's rows bucket (its autotuning key, and its row tile unless a config's ROW_TILE is
    smaller): the smallest of 16 / 32 / 64 that covers `rows` (64 past that)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def settled(N: int, K: int, M: int, dtype: torch.dtype, bias_dtype: torch.dtype | None = None
            ) -> tuple[Kernel, triton.Config | None]:
    """The kernel and config the timed calls so far settled on for this shape (None: not autotuned yet), as
    `int8_mm_triton` picks them without `kernel` / `config`; benchmarks print it."""
    kernel = _faster.get((N, K, M, dtype, bias_dtype), "dot")
    return kernel, _timed.get((kernel, N, K, None if kernel == "gemv" else block_m(M), dtype, bias_dtype))


def split_tiles(M: int, N: int) -> int:
    """Tile counters the split digits route needs at most: its smallest tiles are 16 rows by the smallest
    BLOCK_N of its configs."""
    return triton.cdiv(M, 16) * triton.cdiv(N, min(c.kwargs["BLOCK_N"] for c in DIGITSK_CONFIGS))


def int8_digits_triton(rows: Tensor, zero: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`naive.int8_digits_naive` in one launch (a program per row): rows [M, K], any strides. zero: the split
    route's fp32 sums [M, N] and int32 tile counters, zeroed in the same launch."""
    M, K = rows.shape
    digits = torch.empty((2, M, K), dtype=torch.int8, device=rows.device)
    unit = torch.empty((M,), dtype=torch.float32, device=rows.device)
    sums, counters = zero if zero is not None else (unit, unit)  # unread without ZERO
    if M:
        block = min(triton.next_power_of_2(K), DIGITS_ROW)
        _digits_kernel[(M,)](rows, digits, unit, sums, counters, M, sums.shape[-1], K, counters.numel(),
                             *rows.stride(), BLOCK_K=block, WHOLE=K <= block, ZERO=zero is not None,
                             num_warps=max(4, min(16, block // 1024)))  # <= 32 of the row's values a thread
    return digits, unit


def int8_mm_triton(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                   kernel: Kernel | None = None, config: int | None = None) -> Tensor:
    """`naive.int8_mm_naive` in one kernel launch: x [..., K] (any strides), codes int8 [N, K], scale [N] (or
    [N, 1]; fp32 in torchao), bias [N] or None; returns [..., N] in x's dtype. Or in two ("digits", raced for
    half-precision x): x's two int8 digits, then `naive.int8_mm_digits_naive` on the int8 tensor cores.

    kernel: one of `_RAW` instead of the choice (tests, benchmarks); config: an index into that kernel's configs
    instead of autotuning (tests; under Triton's interpreter the default is the first).
    """
    K, N = x.shape[-1], codes.shape[0]
    if codes.dtype != torch.int8 or codes.dim() != 2 or codes.shape[1] != K:
        raise ValueError(f"codes must be int8 [N, {K}] for x [..., {K}], got {codes.dtype} {list(codes.shape)}")
    rows = x.reshape(-1, K)  # a view wherever the strides allow: the kernels take any row and column stride
    M = rows.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    scale = scale.reshape(-1).float().contiguous()
    dtypes = (x.dtype, None if bias is None else bias.dtype)
    untimed = TRITON_INTERPRET or (x.is_cuda and torch.cuda.is_current_stream_capturing())

    def launch(kernel: Kernel, config: int | None) -> None:
        meta: dict[str, tp.Any] = {"HAS_BIAS": bias is not None}
        if kernel != "gemv":
            meta |= {"ROWS": block_m(M)} | ({} if kernel in DIGITS else {"FP32": x.dtype == torch.float32})
        # split-K programs add their partial sums into a zeroed fp32 buffer, cast to x's dtype after
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device) if kernel in BUFFERED else y
        head = (codes, scale, scale if bias is None else bias.contiguous())
        if kernel in DIGITS:
            # split over K, the splits add into fp32 sums and count themselves at tile counters (zeroed with the
            # digits), the last one stores y; whole K, y directly (the buffers are not read)
            split = kernel == "digitsk"
            sums = torch.empty((M, N), dtype=torch.float32, device=x.device) if split else y
            counters = torch.empty(split_tiles(M, N), dtype=torch.int32, device=x.device) if split else y
            digits, unit = int8_digits_triton(rows, (sums, counters) if split else None)
            args = (digits, unit, *head, sums, counters, y, M, N, K, *codes.stride(), y.stride(0))
        else:
            args = (rows, *head, out, M, N, K, *rows.stride(), *codes.stride(), out.stride(0))

        def grid(m: dict[str, tp.Any]) -> tuple[int, int, int]:
            return triton.cdiv(M, m.get("BLOCK_M", 1)), triton.cdiv(N, m["BLOCK_N"]), m.get("SPLIT_K", 1)

        shape = (kernel, N, K, meta.get("ROWS"), *dtypes)
        if config is None and untimed and (TRITON_INTERPRET or shape not in _timed):
            config = 0  # autotuning times on the stream, which would break a capture: there an untimed shape runs untuned
            _capture_untuned(shape)
        if config is None:
            _TUNED[kernel][grid](*args, **meta)
            _timed[shape] = _TUNED[kernel].best_config
        else:
            raw, configs = _RAW[kernel]
            c = configs[config]
            raw[grid](*args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        if out is not y:
            y.copy_(out)  # the race times the cast too

    if kernel is None:
        # every kernel can win somewhere (CUDA-core multiply-adds vs tensor cores with wasted rows up to
        # GEMV_MAX_M rows; whole-K tiles vs split K by how many tiles fill the SMs): at a shape's first call each is
        # autotuned, then they are timed against each other; untimed: whole-K tiles
        choice = (N, K, M, *dtypes)
        if choice not in _faster and not untimed and config is None:
            kernels: tuple[Kernel, ...] = ("gemv", "dot", "splitk") if M <= GEMV_MAX_M else ("dot", "splitk")
            if x.dtype != torch.float32:
                kernels += ("digits", "digitsk")  # x to 2^-16 of its row's max: finer than half precision, not fp32
            # the timer's eager first call autotunes each kernel, before it captures the tuned launch
            _faster[choice] = min(kernels, key=lambda k: _median_ms(lambda: launch(k, None)))
        if choice not in _faster and untimed and config is None:
            _capture_untuned(choice)
        kernel = _faster.get(choice, "dot")
    launch(kernel, config)
    return y.reshape(*x.shape[:-1], N)

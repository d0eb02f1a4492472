"""`step.inplace_step_` with its two passes over the delta fused into one Triton kernel.

Why: serving batches many streams, and the torch step touches every stream's full [D, F] fp32 delta about five
times a frame (the read `Delta q`, the decay's multiply, the masked chunk-end write, each a read and a write),
although only a stream at its chunk's last frame changes its delta. At Moshi-7B shape (D 4096, F 11264, layers
28-31) that is ~3.8 GB of traffic per stream and frame, and the server step grew by 1.44 ms per stream
(docs/benchmarks.md). Here each program reads one [BLOCK_D, F] row block of one stream's delta once, for the
read, and writes it back only when that stream is at its chunk end (lambda * Delta + V^T K over the chunk's
buffered pairs; TF32 products, fp32 sums: see below): one read per frame, one write per chunk. No host sync:
whether a stream writes is read on the GPU, so one captured CUDA graph serves every frame, as the torch step's
does.

The buffer row write, the clearing of finished chunks and the offsets stay in torch (`step.inplace_step_`, the
reference this kernel is held equal to in tests/test_inplace_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D, BLOCK_F = 32, 128  # a [32, 128] fp32 tile of the delta per loop step: 16 KB, 32 registers a thread
# The write's products on CUDA: TF32 (10-bit mantissas, fp32 sums, on tensor cores). A chunk end costs 2 D C F
# flops per stream (5.9 GFLOP a layer at Moshi-7B shape) and streams started together end their chunks on the
# same frame: with fp32-accurate "tf32x3" that frame took ~50 ms more at 64 streams (H200, 2026-12-02), over the
# 80-ms budget. TF32 rounds the write by ~5e-4 of itself, and a chunk's write is ~1e-3 of the delta it joins
# (InPlaceState): ~5e-7 of the delta, three orders below the bf16 model's own rounding; the delta and every sum
# stay fp32. Plain fp32 in the interpreter.


@triton.jit
def _read_write_kernel(delta_ptr, q_ptr, keys_ptr, values_ptr, done_ptr, decay_ptr, decay_value, o_ptr, D, F,
                       C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, PRECISION: tl.constexpr,
                       DECAY_TENSOR: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rc = tl.arange(0, C)
    done = tl.load(done_ptr + b) != 0
    if DECAY_TENSOR:  # a learned lambda lives on the GPU
        decay = tl.load(decay_ptr).to(tl.float32)
    else:
        decay = decay_value
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row = delta_ptr + b * D * F + rd[:, None] * F
    for f0 in range(0, F, BLOCK_F):
        rf = f0 + tl.arange(0, BLOCK_F)
        inside = (rd[:, None] < D) & (rf[None, :] < F)
        block = tl.load(row + rf[None, :], mask=inside, other=0.0)
        q = tl.load(q_ptr + b * F + rf, mask=rf < F, other=0.0)
        acc += tl.sum(block * q[None, :], axis=1)  # the read sees the delta before this frame's write
        if done:  # a runtime branch: the write's products are computed only at a stream's chunk end
            v = tl.load(values_ptr + b * C * D + rc[:, None] * D + rd[None, :], mask=rd[None, :] < D, other=0.0)
            k = tl.load(keys_ptr + b * C * F + rc[:, None] * F + rf[None, :], mask=rf[None, :] < F, other=0.0)
            write = tl.dot(tl.trans(v), k, input_precision=PRECISION)  # [BLOCK_D, BLOCK_F] = V^T K
            tl.store(row + rf[None, :], decay * block + write, mask=inside)
    tl.store(o_ptr + b * D + rd, acc, mask=rd < D)


def applies(delta: Tensor, keys: Tensor) -> bool:
    """The shapes this kernel takes: fp32, a chunk of 16+ frames that is a power of two (tl.dot's sides)."""
    C = keys.shape[1]
    return delta.dtype == torch.float32 and C >= 16 and C & (C - 1) == 0


def read_and_write_(delta: Tensor, q: Tensor, keys: Tensor, values: Tensor, done: Tensor,
                    decay: float | Tensor) -> Tensor:
    """o = Delta q [B, D] with the delta before the write; then, for streams where `done` [B] (bool), Delta <-
    decay * Delta + values^T keys (keys [B, C, F], values [B, C, D]). fp32, delta contiguous; see `applies`."""
    B, D, F = delta.shape
    C = keys.shape[1]
    o = delta.new_empty(B, D)
    tensor = isinstance(decay, Tensor)  # a float goes in as a value: no host-to-device copy inside a graph capture
    grid = (B, triton.cdiv(D, BLOCK_D))
    _read_write_kernel[grid](delta, q.float().contiguous(), keys.contiguous(), values.contiguous(),
                             done.to(torch.int8), decay if tensor else o, 1.0 if tensor else float(decay), o, D, F,
                             C=C, BLOCK_D=BLOCK_D, BLOCK_F=BLOCK_F, PRECISION="tf32" if delta.is_cuda else "ieee",
                             DECAY_TENSOR=tensor)
    return o

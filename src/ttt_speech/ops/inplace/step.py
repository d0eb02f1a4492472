"""Streaming in-place fast weights: one frame per stream, state updated in place, CUDA-graph capturable.

`reference.inplace_chunked` for T = 1: read through the chunk's start weights, put the frame's pair
in its buffer row, and at a chunk's last frame write the buffer into Delta. No host sync and no
Python branching on tensor values: the write runs every frame with the values of streams that are
not at a chunk end masked to zero (adding exact zeros), so one captured graph serves every frame
and a chunk-end frame costs what any other frame costs. Streams whose `exec_mask` is False keep
their state bit for bit. A decay lambda < 1 likewise scales every stream's delta every frame, by
lambda at a stream's chunk end and by an exact 1 elsewhere: one more pass over the delta per frame
(a [D, F] read and write, a third of the write's traffic). With the float 1.0 (no decay) that pass
is left out, and the step is the one without decay, bit for bit.

That costs every stream a full fp32 GEMM and ~5 passes over its delta every frame; on CUDA `triton_step` fuses
the read and the write into one pass that writes (and multiplies) only at a stream's chunk end, and this torch
form is its reference (tests/test_inplace_triton.py).
"""

from __future__ import annotations

import functools
import typing as tp

import torch
from torch import Tensor

from ttt_speech.ops.triton_env import triton_runs_on


@functools.cache
def _fused_kernel() -> tp.Any:
    """`triton_step` (the read and the chunk-end write in one pass over the delta), or None without Triton."""
    try:
        from ttt_speech.ops.inplace import triton_step
    except ImportError:
        return None
    return triton_step


@torch.no_grad()
def inplace_step_(
    q: Tensor, k: Tensor, v: Tensor, delta: Tensor, buf_k: Tensor, buf_v: Tensor, offset: Tensor, chunk: int,
    exec_mask: Tensor | None = None, decay: float | Tensor = 1.0, fused: bool | None = None,
) -> Tensor:
    """q, k: [B, F]; v: [B, D]; decay: lambda (a float or a 0-dim tensor). Mutates delta, buf_k, buf_v,
    offset; returns o = Delta q [B, D]. fused: the read and the write through `triton_step` (one pass over the
    delta, written only at a chunk end); None: where Triton runs on these tensors and the shapes apply."""
    run = torch.ones_like(offset, dtype=torch.bool) if exec_mask is None else exec_mask.to(torch.bool)
    row = (torch.arange(chunk, device=q.device) == offset[:, None]) & run[:, None]  # [B, C]
    buf_k.copy_(torch.where(row[..., None], k[:, None], buf_k))
    buf_v.copy_(torch.where(row[..., None], v[:, None], buf_v))
    done = run & (offset == chunk - 1)
    kernel = _fused_kernel()
    if fused is None:
        fused = kernel is not None and triton_runs_on(delta) and kernel.applies(delta, buf_k)
    if fused:
        o = kernel.read_and_write_(delta, q, buf_k, buf_v, done, decay)
    else:
        o = torch.bmm(delta, q[..., None])[..., 0]  # the read sees the delta before this frame's write
        if isinstance(decay, Tensor) or decay != 1.0:  # a Python value, fixed per captured graph
            delta.mul_(torch.where(done[:, None, None], decay, 1.0))
        delta.baddbmm_(torch.where(done[:, None, None], buf_v, 0.0).transpose(1, 2), buf_k)
    buf_k.copy_(torch.where(done[:, None, None], 0.0, buf_k))
    buf_v.copy_(torch.where(done[:, None, None], 0.0, buf_v))
    offset.copy_(torch.where(run, (offset + 1) % chunk, offset))
    return o
